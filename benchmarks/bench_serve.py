"""``detforge serve`` under load on loopback: end-to-end latency vs the bare ``Predictor``, and what dynamic
batching buys when many clients call at once.

Same model (a stand-in mobilenet-v3 SSD exported at 320 px, ``common.export_bench_deploy``, unless
``--deploy`` is given), same 640x360 JPEG (a synthetic storage-box frame), same ONNX Runtime thread
count, in one run:
1. bare ``Predictor.predict([jpeg bytes])`` one call at a time (decode + model) -> p50;
2. one HTTP client, one request at a time -> p50/p99, overhead vs 1 (target <= 10 %);
3. ``--clients`` concurrent clients x ``--requests`` each, with ``--max-batch 8`` and with ``--max-batch 1``
   -> throughput, p50/p99.

    python benchmarks/bench_serve.py [--deploy DIR] [--size 320] [--sequential 60] [--clients 8]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_frames, export_bench_deploy, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_deploy(size: int) -> Path:
    """A random-init mobilenet-v3 SSD exported at ``size`` px, cached in benchmarks/data/ (torch is used
    here only, never by the server)."""
    return export_bench_deploy(REPO / "benchmarks" / "data" / f"deploy-mobilenet-v3-{size}", image_size=size)


def test_jpeg() -> bytes:
    """A 640x360 synthetic frame with a yellow box (the stand-in model finds a dozen boxes in it)."""
    return bench_frames(16)[15]


def percentiles(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values) * 1000.0
    return float(np.percentile(array, 50)), float(np.percentile(array, 99))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(deploy: Path, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "serve",
            str(deploy),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def sequential(url: str, body: bytes, n: int) -> list[float]:
    import httpx

    times = []
    with httpx.Client() as client:
        for _ in range(3):
            client.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"})
        for _ in range(n):
            t0 = time.perf_counter()
            response = client.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"})
            times.append(time.perf_counter() - t0)
            assert response.status_code == 200
    return times


def concurrent(url: str, body: bytes, clients: int, requests: int) -> tuple[list[float], float, int]:
    import httpx

    times: list[float] = []
    errors = [0]
    barrier = threading.Barrier(clients + 1)

    def run() -> None:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            for _ in range(requests):
                t0 = time.perf_counter()
                response = client.post(
                    f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                )
                times.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    errors[0] += 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return times, time.perf_counter() - t0, errors[0]


def metric_sum(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sequential", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()

    from detforge.runtime import Predictor

    deploy = args.deploy or make_deploy(args.size)
    body = test_jpeg()
    predictor = Predictor(str(deploy), threads=args.threads)
    for _ in range(3):
        predictor.predict([body])
    detections = len(predictor.predict([body])[0])
    bare = []
    for _ in range(args.sequential):
        t0 = time.perf_counter()
        predictor.predict([body])
        bare.append(time.perf_counter() - t0)
    del predictor
    bare_p50, bare_p99 = percentiles(bare)
    rows = [
        {
            "case": "bare Predictor, batch 1",
            "requests": len(bare),
            "detections_per_image": detections,
            "p50_ms": round(bare_p50, 2),
            "p99_ms": round(bare_p99, 2),
            "throughput_rps": round(len(bare) / sum(bare), 1),
        }
    ]

    process, url = start(deploy, args.threads, "--max-batch", "8", "--max-wait-ms", "5")
    try:
        seq = sequential(url, body, args.sequential)
        seq_p50, seq_p99 = percentiles(seq)
        rows.append(
            {
                "case": "serve, 1 client, max-batch 8",
                "requests": len(seq),
                "p50_ms": round(seq_p50, 2),
                "p99_ms": round(seq_p99, 2),
                "throughput_rps": round(len(seq) / sum(seq), 1),
                "overhead_vs_bare": round(seq_p50 / bare_p50 - 1, 3),
            }
        )
        runs0, images0 = (
            metric_sum(url, "detforge_batch_size_count"),
            metric_sum(url, "detforge_batch_size_sum"),
        )
        times, wall, errors = concurrent(url, body, args.clients, args.requests)
        runs = metric_sum(url, "detforge_batch_size_count") - runs0
        images = metric_sum(url, "detforge_batch_size_sum") - images0
        p50, p99 = percentiles(times)
        rows.append(
            {
                "case": f"serve, {args.clients} clients, max-batch 8",
                "requests": len(times),
                "errors": errors,
                "p50_ms": round(p50, 2),
                "p99_ms": round(p99, 2),
                "throughput_rps": round(len(times) / wall, 1),
                "mean_batch": round(images / runs, 2),
            }
        )
    finally:
        stop(process)

    process, url = start(deploy, args.threads, "--max-batch", "1")
    try:
        times1, wall1, errors1 = concurrent(url, body, args.clients, args.requests)
        p50_1, p99_1 = percentiles(times1)
        rows.append(
            {
                "case": f"serve, {args.clients} clients, max-batch 1",
                "requests": len(times1),
                "errors": errors1,
                "p50_ms": round(p50_1, 2),
                "p99_ms": round(p99_1, 2),
                "throughput_rps": round(len(times1) / wall1, 1),
                "mean_batch": 1.0,
            }
        )
    finally:
        stop(process)

    batched, unbatched = rows[2]["throughput_rps"], rows[3]["throughput_rps"]
    summary = (
        f"batch 1: serve p50 {seq_p50:.1f} ms vs bare Predictor {bare_p50:.1f} ms "
        f"(overhead {100 * (seq_p50 / bare_p50 - 1):+.1f} %, target <= 10 %); {args.clients} clients: "
        f"{batched} req/s batched (mean batch {rows[2]['mean_batch']}) vs {unbatched} req/s unbatched "
        f"(x{batched / unbatched:.2f}), p99 {rows[2]['p99_ms']} vs {rows[3]['p99_ms']} ms"
    )
    write_result(
        "serve",
        title=f"detforge serve on loopback ({args.size} px mobilenet-v3, {args.threads} threads)",
        rows=rows,
        summary=summary,
        notes="Client, server and model share this machine's 2 CPU cores with other work; ratios within "
        "this run are meaningful, absolute figures less so.",
    )


if __name__ == "__main__":
    main()
