"""``detforge serve`` held under hostile load on loopback, bounded in time: does it stay up, answer only
2xx/4xx/503, and keep its memory under a stated bound?

One server (the stand-in 320 px mobilenet-v3 SSD of ``common.export_bench_deploy``, default limits:
``--max-in-flight 32 --max-queue 16 --max-images 64``, ``--allow-path`` on a folder of 4 frames) and
``--clients`` concurrent clients (more than ``--max-in-flight``, so the server must push back) for
``--duration`` seconds. Each client loops over a fixed mix of valid and hostile requests:

valid: a 640x360 JPEG, the same frame as PNG, a JSON Lines request naming 2 allowed files;
hostile: a body over the 6 MiB limit, a truncated JPEG, random bytes as image/png, a wrong Content-Type,
no Content-Type, a 20000x20000 1-bit PNG bomb (about 50 KB on the wire), JSON Lines naming 5000 files
(thousands of refs), JSON Lines naming /etc/passwd, a body that is not JSON Lines.

Reported: requests/s held (all answers, and 2xx), p50/p99 latency of valid requests and of all, answers by
kind and status, transport errors (must be 0), 5xx other than 503 (must be 0), and the server's peak
RSS (sampled every 20 ms) against ``--rss-bound-mib``.

    python benchmarks/bench_serve_load.py [--clients 48] [--duration 30] [--rss-bound-mib 1024]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import make_deploy, start, stop, test_jpeg  # noqa: E402
from common import bench_frames, write_result  # noqa: E402


def bilevel_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG: tiny on the wire, width x height x 3 bytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def request_mix(folder: Path) -> list[tuple[str, bool, bytes, dict]]:
    """(kind, valid, body, headers) of every request a client sends, in its loop order."""
    from PIL import Image

    jpeg = test_jpeg()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    for i, frame in enumerate(bench_frames(4)):
        (folder / f"frame{i}.jpg").write_bytes(frame)
    refs = [json.dumps({"source-ref": str(folder / f"frame{i}.jpg")}) for i in range(4)]
    jsonl = {"Content-Type": "application/jsonlines"}
    image = {"Content-Type": "image/jpeg"}
    rng = np.random.default_rng(0)
    return [
        ("valid jpeg", True, jpeg, image),
        ("valid png", True, png.getvalue(), {"Content-Type": "image/png"}),
        ("valid jsonlines (2 refs)", True, "\n".join(refs[:2]).encode(), jsonl),
        ("oversized body (7 MiB)", False, b"\xff" * (7 * 2**20), image),
        ("truncated jpeg", False, jpeg[: len(jpeg) // 3], image),
        ("random bytes as png", False, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
         {"Content-Type": "image/png"}),
        ("wrong content type", False, jpeg, {"Content-Type": "text/plain"}),
        ("no content type", False, jpeg, {}),
        ("20000x20000 png bomb", False, bilevel_png(20000, 20000), {"Content-Type": "image/png"}),
        ("5000 refs", False, "\n".join(refs[i % 4] for i in range(5000)).encode(), jsonl),
        ("ref outside --allow-path", False, json.dumps({"source-ref": "/etc/passwd"}).encode(), jsonl),
        ("not json lines", False, b"{not json\n", jsonl),
    ]


def watch_rss(pid: int, stop_event: threading.Event, peak: list[float]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop_event.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        except psutil.Error:
            return
        stop_event.wait(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rss-bound-mib", type=float, default=1024.0)
    args = parser.parse_args()

    import httpx

    deploy = args.deploy or make_deploy(args.size)
    folder = Path(tempfile.mkdtemp(prefix="detforge-load-"))
    mix = request_mix(folder)
    process, url = start(deploy, args.threads, "--allow-path", str(folder))
    import psutil

    idle_rss = psutil.Process(process.pid).memory_info().rss / 2**20
    answers: collections.Counter = collections.Counter()  # (kind, status or error name)
    latency: dict[str, list[float]] = {"valid 2xx": [], "503": [], "all": []}
    lock = threading.Lock()
    peak = [idle_rss]
    stop_event = threading.Event()
    watcher = threading.Thread(target=watch_rss, args=(process.pid, stop_event, peak), daemon=True)
    watcher.start()
    barrier = threading.Barrier(args.clients + 1)

    def client(index: int) -> None:
        order = list(range(len(mix)))
        random.Random(index).shuffle(order)
        with httpx.Client(timeout=120) as session:
            barrier.wait()
            i = 0
            while not stop_event.is_set():
                kind, valid, body, headers = mix[order[i % len(order)]]
                i += 1
                started = time.perf_counter()
                try:
                    status = session.post(f"{url}/invocations", content=body, headers=headers).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                took = time.perf_counter() - started
                with lock:
                    answers[(kind, status)] += 1
                    latency["all"].append(took)
                    if valid and isinstance(status, int) and status < 300:
                        latency["valid 2xx"].append(took)
                    elif status == 503:
                        latency["503"].append(took)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    time.sleep(args.duration)
    stop_event.set()
    for thread in threads:
        thread.join(180)
    wall = time.perf_counter() - began
    alive = httpx.get(f"{url}/ping").status_code == 200
    rejected = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("detforge_requests_rejected_total{"):
            key, _, value = line.rpartition(" ")
            rejected[key.split('"')[1]] = int(float(value))
    stop(process)
    watcher.join(5)

    total = sum(answers.values())
    statuses = collections.Counter()
    for (_, status), n in answers.items():
        statuses[status if isinstance(status, str) else f"{status // 100}xx" if status != 503 else "503"] += n
    transport = sum(n for (_, status), n in answers.items() if isinstance(status, str))
    server_errors = sum(n for (_, s), n in answers.items() if isinstance(s, int) and s >= 500 and s != 503)
    only_expected = transport == 0 and server_errors == 0
    p = lambda values, q: round(float(np.percentile(np.asarray(values) * 1000, q)), 1)  # noqa: E731
    rows = []
    for kind, valid, _, _ in mix:
        by_status = {str(s): n for (k, s), n in sorted(answers.items(), key=str) if k == kind}
        rows.append({"request": kind, "valid": valid, "answers": sum(by_status.values()),
                     "by status": ", ".join(f"{s}: {n}" for s, n in by_status.items())})
    ok = statuses.get("2xx", 0)
    summary = (
        f"{args.clients} clients for {wall:.0f} s, {len(mix) - 3} kinds of hostile request among 3 valid: "
        f"{total / wall:.1f} answers/s held ({ok / wall:.1f}/s 2xx), 2xx p50/p99 "
        f"{p(latency['valid 2xx'], 50)}/{p(latency['valid 2xx'], 99)} ms; answers "
        f"{dict(sorted(statuses.items()))}; transport errors {transport}, "
        f"5xx other than 503: {server_errors} ({'only 2xx/4xx/503' if only_expected else 'FAILED'}); "
        f"peak RSS {peak[0]:.0f} MiB (idle {idle_rss:.0f}) vs bound {args.rss_bound_mib:.0f} MiB "
        f"({'held' if peak[0] <= args.rss_bound_mib else 'EXCEEDED'}); still answering /ping: {alive}"
    )
    rows.append({"request": "all", "answers": total, "by status": ", ".join(
        f"{s}: {n}" for s, n in sorted(statuses.items()))})
    write_result(
        "serve_load",
        title=f"detforge serve under hostile load ({args.clients} clients, {args.size} px mobilenet-v3, "
        f"{args.threads} threads, default limits)",
        rows=rows,
        summary=summary,
        notes=(
            f"p50/p99 of 503 answers {p(latency['503'], 50)}/{p(latency['503'], 99)} ms, of all answers "
            f"{p(latency['all'], 50)}/{p(latency['all'], 99)} ms. 503s by what was full (server metrics): "
            f"{rejected or 'none'}. The clients retry at once (they ignore Retry-After: the worst case), so "
            "a saturated model (about one batch of 8 in the model and one waiting fills --max-queue 16) "
            "turns into many fast 503s, not into memory. Server limits: --max-in-flight 32, --max-queue 16, "
            "--max-images 64, --max-body-mb 6, --max-pixels 40000000. Clients (Python threads, httpx) and "
            "the server share this machine's cores with other work."
        ),
    )
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    if not (only_expected and alive and peak[0] <= args.rss_bound_mib):
        sys.exit(1)


if __name__ == "__main__":
    main()
