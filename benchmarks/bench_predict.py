"""``detforge predict`` on a folder of frames: throughput without and with the PDF/HTML reports, and peak
memory as the number of images grows (the reports are streamed, so it should stay flat).

Same model (a stand-in mobilenet-v3 SSD exported at 320 px, ``common.export_bench_deploy``, unless
``--deploy`` is given), 640x360 synthetic storage-box JPEG frames; each configuration runs the real CLI
in a fresh process (``python -m detforge predict``), whose wall time and peak RSS (``wait4``) are taken.

    python benchmarks/bench_predict.py [--deploy DIR] [--small 200] [--large 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_frames, export_bench_deploy, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_predict(deploy: Path, folder: Path, out: Path, *, reports: str, threads: int) -> dict:
    """One ``detforge predict`` process: seconds, peak RSS (MiB), output sizes."""
    command = [sys.executable, "-m", "detforge", "predict", str(deploy), str(folder), "--out",
               str(out / "predictions.jsonl"), "--threshold", "0.3", "--threads", str(threads)]
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
    sizes = {name: (out / name).stat().st_size for name in ("report.pdf", "report.html")
             if (out / name).exists()}
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path, default=None)
    parser.add_argument("--small", type=int, default=200, help="images in the throughput runs")
    parser.add_argument("--large", type=int, default=1000, help="images in the memory run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    deploy = args.deploy or export_bench_deploy(REPO / "benchmarks" / "data" / "deploy-mobilenet-v3-320",
                                                image_size=320)
    frames = bench_frames(min(args.small, 200))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for count in sorted({args.small, args.large}):
            folder = root / f"frames-{count}"
            folder.mkdir()
            for i in range(count):  # frames repeat past 200: same content, same cost
                (folder / f"frame_{i:05d}.jpg").write_bytes(frames[i % len(frames)])
        plan = [(args.small, "none"), (args.small, "pdf"), (args.small, "html"), (args.small, "pdf+html"),
                (args.large, "pdf+html")]
        for count, reports in plan:
            out = root / f"out-{count}-{reports}"
            out.mkdir()
            measured = run_predict(deploy, root / f"frames-{count}", out, reports=reports,
                                   threads=args.threads)
            row = {"images": count, "reports": reports, "seconds": round(measured["seconds"], 2),
                   "images_per_s": round(count / measured["seconds"], 1),
                   "peak_rss_mib": round(measured["peak_rss_mib"], 1)}
            for name, size in measured["sizes"].items():
                row[f"{name.split('.')[1]}_kib_per_image"] = round(size / 1024 / count, 1)
            rows.append(row)
            print(row, flush=True)
    base = rows[0]["images_per_s"]
    both = rows[3]
    overhead = 100 * (base / both["images_per_s"] - 1)
    summary = (f"{base} images/s without reports, {both['images_per_s']} with PDF+HTML "
               f"(+{overhead:.0f} % time); peak RSS {rows[3]['peak_rss_mib']} MiB at {args.small} images vs "
               f"{rows[4]['peak_rss_mib']} MiB at {args.large} (reports streamed)")
    write_result("predict", title="detforge predict: throughput and memory with reports", rows=rows,
                 summary=summary,
                 notes=f"stand-in mobilenet-v3 SSD at 320 px, 640x360 JPEG frames, threshold 0.3, --threads "
                       f"{args.threads}; each row is one fresh `python -m detforge predict` process")


if __name__ == "__main__":
    main()
