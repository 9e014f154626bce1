"""``detforge predict`` on a folder of frames: throughput without and with the PDF/HTML reports, and peak
memory as the number of images grows (the reports are streamed, so it should stay flat); then the same
1,000 images with ``--engine ray`` (a local Ray instance: 1 worker of 2 threads, 2 workers of 1 thread)
against the single process on the same cores.

Same model (a stand-in mobilenet-v3 SSD exported at 320 px, ``common.export_bench_deploy``, unless
``--deploy`` is given), 640x360 synthetic storage-box JPEG frames; each configuration runs the real CLI
in a fresh process (``detforge.cli.main`` in a new interpreter), whose wall time, peak RSS (``wait4``: the
largest of it and the children it waited for) and the driver's own peak RSS (``RUSAGE_SELF``) are taken.

    python benchmarks/bench_predict.py [--deploy DIR] [--small 200] [--large 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_frames, export_bench_deploy, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# The CLI in a fresh interpreter that reports its own peak RSS on stderr before it exits.
DRIVER = (
    "import resource, sys; from detforge.cli import main; code = main(sys.argv[1:]); "
    "print('DRIVER_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run_predict(
    deploy: Path, folder: Path, out: Path, *, reports: str, threads: int, ray_workers: int | None = None
) -> dict:
    """One ``detforge predict`` process: seconds, peak RSS (MiB), the driver's peak RSS, output sizes."""
    target = out / "predictions" if ray_workers else out / "predictions.jsonl"
    command = [
        sys.executable,
        "-c",
        DRIVER,
        "predict",
        str(deploy),
        str(folder),
        "--out",
        str(target),
        "--threshold",
        "0.3",
        "--threads",
        str(threads),
    ]
    if ray_workers:
        command += ["--engine", "ray", "--workers", str(ray_workers)]
    if "pdf" in reports:
        command += ["--report", str(out / "report.pdf")]
    if "html" in reports:
        command += ["--html", str(out / "report.html")]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    output = process.stdout.read().decode() + process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
    sizes = {
        name: (out / name).stat().st_size for name in ("report.pdf", "report.html") if (out / name).exists()
    }
    driver = [line for line in output.splitlines() if line.startswith("DRIVER_MAXRSS_KIB")]
    return {
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "driver_rss_mib": int(driver[-1].split()[1]) / 1024,
        "sizes": sizes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200, help="images in the throughput runs")
    parser.add_argument("--large", type=int, default=1000, help="images in the memory run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the --engine ray rows")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each engine row (median shown)")
    args = parser.parse_args()
    deploy = args.deploy or export_bench_deploy(
        REPO / "benchmarks" / "data" / "deploy-mobilenet-v3-320", image_size=320
    )
    frames = bench_frames(min(args.small, 200))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for count in sorted({args.small, args.large}):
            folder = root / f"frames-{count}"
            folder.mkdir()
            for i in range(count):  # frames repeat past 200: same content, same cost
                (folder / f"frame_{i:05d}.jpg").write_bytes(frames[i % len(frames)])
        plan = [(args.small, reports) for reports in ("none", "pdf", "html", "pdf+html")]
        plan.append((args.large, "pdf+html"))
        for count, reports in plan:
            out = root / f"out-{count}-{reports}"
            out.mkdir()
            measured = run_predict(
                deploy, root / f"frames-{count}", out, reports=reports, threads=args.threads
            )
            row = {
                "images": count,
                "reports": reports,
                "engine": "local",
                "threads": args.threads,
                "seconds": round(measured["seconds"], 2),
                "images_per_s": round(count / measured["seconds"], 1),
                "peak_rss_mib": round(measured["peak_rss_mib"], 1),
                "driver_rss_mib": round(measured["driver_rss_mib"], 1),
            }
            for name, size in measured["sizes"].items():
                row[f"{name.split('.')[1]}_kib_per_image"] = round(size / 1024 / count, 1)
            rows.append(row)
            print(row, flush=True)
        # the engines on the same cores: one process of 2 threads and of 1, 1 actor of 2 threads, 2 actors
        # of 1; interleaved and repeated, as the shared machine's load drifts (the median is the figure)
        engines = [] if args.no_ray else [(2, None), (1, None), (2, 1), (1, 2)]
        runs: dict[tuple, list[dict]] = {engine: [] for engine in engines}
        for repeat in range(args.repeat):
            for threads, workers in engines:
                out = root / f"out-engine-{threads}-{workers}-{repeat}"
                out.mkdir()
                measured = run_predict(
                    deploy,
                    root / f"frames-{args.large}",
                    out,
                    reports="none",
                    threads=threads,
                    ray_workers=workers,
                )
                runs[(threads, workers)].append(measured)
                print(threads, workers, repeat, measured, flush=True)
        for (threads, workers), measured in runs.items():
            seconds = statistics.median(m["seconds"] for m in measured)
            name = "local" if workers is None else f"ray, {workers} worker{'s' * (workers > 1)}"
            rows.append(
                {
                    "images": args.large,
                    "reports": "none",
                    "engine": name,
                    "threads": threads,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(args.large / seconds, 1),
                    "peak_rss_mib": round(max(m["peak_rss_mib"] for m in measured), 1),
                    "driver_rss_mib": round(max(m["driver_rss_mib"] for m in measured), 1),
                    "runs_s": " / ".join(f"{m['seconds']:.1f}" for m in measured),
                }
            )
            print(rows[-1], flush=True)
    base = rows[0]["images_per_s"]
    both = rows[3]
    overhead = 100 * (base / both["images_per_s"] - 1)
    summary = (
        f"{base} images/s without reports, {both['images_per_s']} with PDF+HTML "
        f"({overhead:+.0f} % time); peak RSS {rows[3]['peak_rss_mib']} MiB at {args.small} images vs "
        f"{rows[4]['peak_rss_mib']} MiB at {args.large} (reports streamed)"
    )
    if not args.no_ray:
        local2, local1, one, two = (row["images_per_s"] for row in rows[5:9])
        summary += (
            f"; {args.large} images, one process of 2 / 1 ONNX Runtime threads {local2} / {local1} "
            f"images/s, Ray 1 worker of 2 threads {one}, 2 workers of 1 {two} (x{two / local1:.2f} "
            f"the 1-thread process); driver RSS {rows[6]['driver_rss_mib']} MiB one process, "
            f"{rows[8]['driver_rss_mib']} MiB Ray"
        )
    write_result(
        "predict",
        title="detforge predict: throughput and memory with reports",
        rows=rows,
        summary=summary,
        notes="stand-in mobilenet-v3 SSD at 320 px, 640x360 JPEG frames, threshold 0.3; each run is "
        "one fresh `detforge predict` process; the last four rows (the engines on the same 2 "
        f"cores) are the median of {args.repeat} interleaved runs (runs_s); a ray run starts "
        "a local Ray instance on the machine's cores (default --block-size 256) and its time "
        "includes Ray's start; threads = ONNX Runtime threads per model (process or actor); "
        "driver_rss = the detforge process's own peak, peak_rss = the largest of it and the "
        "children it waited for; in this run (`nice -n 10`) Ray's workers ran at nice 19, the "
        "rest at 10",
    )


if __name__ == "__main__":
    main()
