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

Then two more rounds, each on a fresh server with its default limits:

slowloris: for ``--slow-duration`` seconds one attacking address (127.0.0.1) keeps 256 connections sending
unfinished headers and 32 sending 10 of a declared 1000-byte body, each dripping a byte a second and
reconnecting when closed (the issue's attack), while ``--slow-clients`` clients on another address
(127.0.0.2) loop on valid JPEG requests;
burst: ``--bursts`` bursts of each size in ``--burst-sizes`` (single JPEG requests released at once from 4
client addresses, so no per-client limit is what refuses them).

Both report held 2xx/s, p50/p99, the 503 rate, the server's peak RSS, and ``/ping``'s truthfulness while
saturated: a prober on its own address asks ``/ping`` and at once sends a request, every 100 ms; /ping is
truthful when it says 200 exactly when the request is then answered 200.

    python benchmarks/bench_serve_load.py [--clients 48] [--duration 30] [--rss-bound-mib 1024]
        [--slow-duration 30] [--slow-clients 8] [--burst-sizes 100,200] [--bursts 3] [--name serve_load]
"""

from __future__ import annotations

import argparse
import asyncio
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
        (
            "random bytes as png",
            False,
            rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            {"Content-Type": "image/png"},
        ),
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


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of ``values`` (seconds) in ms, or None when there are none."""
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 1) if values else None


def probe_ping(url: str, body: bytes, stop_event: threading.Event, pairs: list) -> None:
    """Every 100 ms from 127.0.0.9: /ping's status, then at once an /invocations status."""
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.9"), timeout=60) as client:
        while not stop_event.is_set():
            pair = []
            for call in (
                lambda: client.get(f"{url}/ping"),
                lambda: client.post(
                    f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                ),
            ):
                try:
                    pair.append(call().status_code)
                except httpx.HTTPError as exc:
                    pair.append(type(exc).__name__)
            pairs.append(tuple(pair))
            stop_event.wait(0.1)


def ping_truth(pairs: list) -> dict:
    """How often /ping told the truth about the request sent right after it."""
    pct = lambda n: round(100 * n / len(pairs), 1) if pairs else None  # noqa: E731
    return {
        "probes": len(pairs),
        "truthful_pct": pct(sum(1 for ping, answer in pairs if (ping == 200) == (answer == 200))),
        "ping_200_request_refused": sum(1 for ping, answer in pairs if ping == 200 and answer != 200),
        "ping_not_200_request_served": sum(1 for ping, answer in pairs if ping != 200 and answer == 200),
        "ping_200_pct": pct(sum(1 for ping, _ in pairs if ping == 200)),
    }


async def _attack(
    port: int, kind: str, stop_event: threading.Event, outcomes: collections.Counter, held: list[float]
) -> None:
    """One slowloris connection after another: unfinished headers or a 10-of-1000-byte body, a byte a
    second; what the server answered each one (408, 503, closed) is counted, and how long it held."""
    first = (
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if kind == "headers"
        else b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 1000\r\n\r\n0123456789"
    )
    drip = b"X" if kind == "headers" else b"x"
    while not stop_event.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first)
            outcome = "still held at the end"
            while not stop_event.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except TimeoutError:
                    writer.write(drip)
                    continue
                outcome = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
                break
            writer.close()
        except OSError as exc:
            outcome = type(exc).__name__
        outcomes[(kind, outcome)] += 1
        held.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


def slowloris_round(deploy: Path, args, jpeg: bytes) -> dict:
    """The issue's slow-client attack against a fresh server, with valid clients on another address."""
    import httpx
    import psutil

    process, url = start(deploy, args.threads)
    port = int(url.rsplit(":", 1)[1])
    peak = [psutil.Process(process.pid).memory_info().rss / 2**20]
    stop_event = threading.Event()
    outcomes: collections.Counter = collections.Counter()
    held: list[float] = []

    def attack() -> None:
        async def everything() -> None:
            await asyncio.gather(
                *(
                    _attack(port, kind, stop_event, outcomes, held)
                    for kind in ["headers"] * 256 + ["body"] * 32
                )
            )

        asyncio.run(everything())

    statuses: collections.Counter = collections.Counter()
    latency: list[float] = []

    def client() -> None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=120) as session:
            while not stop_event.is_set():
                started = time.perf_counter()
                try:
                    status = session.post(
                        f"{url}/invocations", content=jpeg, headers={"Content-Type": "image/jpeg"}
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                statuses[status] += 1
                if status == 200:
                    latency.append(time.perf_counter() - started)

    pairs: list = []
    threads = [
        threading.Thread(target=attack, daemon=True),
        threading.Thread(target=watch_rss, args=(process.pid, stop_event, peak), daemon=True),
        threading.Thread(target=probe_ping, args=(url, jpeg, stop_event, pairs), daemon=True),
    ]
    threads[0].start()
    time.sleep(3)  # the attack takes hold before the valid clients come
    threads += [threading.Thread(target=client, daemon=True) for _ in range(args.slow_clients)]
    for thread in threads[1:]:
        thread.start()
    began = time.perf_counter()
    time.sleep(args.slow_duration)
    stop_event.set()
    for thread in threads:
        thread.join(120)
    wall = time.perf_counter() - began
    alive = httpx.get(f"{url}/ping").status_code == 200
    stop(process)
    total = sum(statuses.values())
    refused = statuses.get(503, 0)
    return {
        "round": f"slowloris: 256 unfinished headers + 32 slow bodies from 127.0.0.1, {args.slow_clients} "
        f"valid clients on 127.0.0.2, {wall:.0f} s",
        "valid 2xx/s": round(statuses.get(200, 0) / wall, 1),
        "valid p50 ms": percentile(latency, 50),
        "valid p99 ms": percentile(latency, 99),
        "valid 503 %": round(100 * refused / total, 1) if total else None,
        "valid answers": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)),
        "attack outcomes": ", ".join(
            f"{kind} {outcome}: {n}" for (kind, outcome), n in sorted(outcomes.items())
        ),
        "attack connection held ms (p50/p99)": f"{percentile(held, 50)}/{percentile(held, 99)}",
        "peak RSS MiB": round(peak[0]),
        "/ping": ping_truth(pairs),
        "alive after": alive,
    }


def burst_round(deploy: Path, args, jpeg: bytes, size: int) -> dict:
    """``args.bursts`` bursts of ``size`` single-image requests released at once against a fresh server."""
    import httpx
    import psutil

    process, url = start(deploy, args.threads)
    peak = [psutil.Process(process.pid).memory_info().rss / 2**20]
    stop_event = threading.Event()
    pairs: list = []
    watchers = [
        threading.Thread(target=watch_rss, args=(process.pid, stop_event, peak), daemon=True),
        threading.Thread(target=probe_ping, args=(url, jpeg, stop_event, pairs), daemon=True),
    ]
    for thread in watchers:
        thread.start()
    statuses: collections.Counter = collections.Counter()
    latency: dict[str, list[float]] = {"2xx": [], "503": []}
    walls = []
    for _ in range(args.bursts):
        barrier = threading.Barrier(size)

        def one(index: int, barrier: threading.Barrier = barrier) -> None:
            transport = httpx.HTTPTransport(local_address=f"127.0.0.{2 + index % 4}")
            with httpx.Client(transport=transport, timeout=300) as session:
                barrier.wait()
                started = time.perf_counter()
                try:
                    status = session.post(
                        f"{url}/invocations", content=jpeg, headers={"Content-Type": "image/jpeg"}
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                statuses[status] += 1
                if status == 200:
                    latency["2xx"].append(time.perf_counter() - started)
                elif status == 503:
                    latency["503"].append(time.perf_counter() - started)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        walls.append(time.perf_counter() - began)
        time.sleep(1)  # the probes see the server drain between bursts
    stop_event.set()
    for thread in watchers:
        thread.join(60)
    alive = httpx.get(f"{url}/ping").status_code == 200
    stop(process)
    total = sum(statuses.values())
    return {
        "round": f"burst: {args.bursts} x {size} single-JPEG requests at once from 4 client addresses",
        "valid 2xx/s": round(statuses.get(200, 0) / sum(walls), 1),
        "valid p50 ms": percentile(latency["2xx"], 50),
        "valid p99 ms": percentile(latency["2xx"], 99),
        "valid 503 %": round(100 * statuses.get(503, 0) / total, 1),
        "valid answers": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)),
        "503 p99 ms": percentile(latency["503"], 99),
        "burst wall s": round(sum(walls) / len(walls), 1),
        "peak RSS MiB": round(peak[0]),
        "/ping": ping_truth(pairs),
        "alive after": alive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--rss-bound-mib", type=float, default=1024.0)
    parser.add_argument("--slow-duration", type=float, default=30.0)
    parser.add_argument("--slow-clients", type=int, default=8)
    parser.add_argument("--burst-sizes", default="100,200")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--name", default="serve_load", help="benchmarks/results/NAME.json")
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
    jpeg = mix[0][2]
    rounds = [slowloris_round(deploy, args, jpeg)]
    rounds += [burst_round(deploy, args, jpeg, int(size)) for size in args.burst_sizes.split(",")]

    total = sum(answers.values())
    statuses = collections.Counter()
    for (_, status), n in answers.items():
        statuses[status if isinstance(status, str) else f"{status // 100}xx" if status != 503 else "503"] += n
    transport = sum(n for (_, status), n in answers.items() if isinstance(status, str))
    server_errors = sum(n for (_, s), n in answers.items() if isinstance(s, int) and s >= 500 and s != 503)
    only_expected = transport == 0 and server_errors == 0
    p = percentile
    rows = []
    for kind, valid, _, _ in mix:
        by_status = {str(s): n for (k, s), n in sorted(answers.items(), key=str) if k == kind}
        rows.append(
            {
                "request": kind,
                "valid": valid,
                "answers": sum(by_status.values()),
                "by status": ", ".join(f"{s}: {n}" for s, n in by_status.items()),
            }
        )
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
    rows.append(
        {
            "request": "all",
            "answers": total,
            "by status": ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        }
    )
    for result in rounds:
        ping = result.pop("/ping")
        rows.append(
            {
                **result,
                "/ping truthful %": ping["truthful_pct"],
                "/ping said 200 but refused": ping["ping_200_request_refused"],
                "/ping probes": ping["probes"],
                "/ping 200 %": ping["ping_200_pct"],
            }
        )
        summary += (
            f"; {result['round'].split(':')[0]} round: {result['valid 2xx/s']} 2xx/s, p99 "
            f"{result['valid p99 ms']} ms, 503 {result['valid 503 %']} %, peak RSS "
            f"{result['peak RSS MiB']} MiB, /ping truthful {ping['truthful_pct']} %"
        )
    write_result(
        args.name,
        title=f"detforge serve under hostile load ({args.clients} clients, {args.size} px mobilenet-v3, "
        f"{args.threads} threads, default limits)",
        rows=rows,
        summary=summary,
        notes=(
            f"p50/p99 of 503 answers {p(latency['503'], 50)}/{p(latency['503'], 99)} ms, of all answers "
            f"{p(latency['all'], 50)}/{p(latency['all'], 99)} ms. 503s by what was full (server metrics): "
            f"{rejected or 'none'}. The clients retry at once (they ignore Retry-After: the worst case); "
            "what does not fit the queue gets a fast 503, never memory. Server limits (defaults): "
            "--max-in-flight 128, --max-queue 100, --max-images 64, --max-body-mb 6, --max-pixels 40000000, "
            "--max-connections 256, --max-client-connections 64, --header-timeout 10, --body-timeout 10. "
            "Clients (Python threads, httpx) and the server share this machine's cores with other work."
        ),
    )
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    held = only_expected and alive and peak[0] <= args.rss_bound_mib
    if not (held and all(result["alive after"] for result in rounds)):
        sys.exit(1)


if __name__ == "__main__":
    main()
