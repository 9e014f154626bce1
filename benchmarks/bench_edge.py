"""``detforge edge`` on this CPU: frame-to-message latency vs the bare model, sustained fps, install size.

Same model (a stand-in mobilenet-v3 SSD exported at 320 px, ``common.export_bench_deploy``, unless
``--deploy`` is given), same frames of one 640x360 video of synthetic storage-box frames, same ONNX
Runtime thread count, in one run:
1. bare ``Predictor.predict([frame])`` on the decoded frames, one at a time -> p50 (the baseline);
2. ``detforge edge VIDEO --fps 1000`` (every frame, as fast as it goes) publishing to a local mosquitto; a
   subscriber takes the arrival time of each message minus its capture ``timestamp`` -> frame-to-message
   p50/p99, overhead = p50 - bare p50 (target <= 5 ms), and sustained fps at batch 1;
3. installed size: site-packages of a virtualenv with only ``detforge[edge]`` (the one
   tests/test_edge_install.py caches) vs the full development ``.venv``.

    python benchmarks/bench_edge.py [--deploy DIR] [--size 320] [--frames 90]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_frames, export_bench_deploy, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_video(path: Path, frames: int) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 360))
    for data in bench_frames(frames):
        writer.write(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    writer.release()
    return path


def site_packages_mib(prefix: Path) -> float:
    found = list(prefix.glob("lib/python*/site-packages"))
    if not found:
        return float("nan")
    total = sum(p.stat().st_size for p in found[0].rglob("*") if p.is_file() and not p.is_symlink())
    return total / 2**20


def edge_venv() -> Path | None:
    """The edge-only virtualenv cached by tests/test_edge_install.py (built there when missing)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import test_edge_install

        return test_edge_install.build_edge_venv()
    except Exception as exc:  # no network for pip, etc.: report the size as unknown
        print(f"edge virtualenv unavailable: {exc}", file=sys.stderr)
        return None


def time_bare(predictor, frames: list) -> list[float]:
    """Milliseconds of ``predictor.predict([frame])`` per frame, one at a time."""
    times = []
    for frame in frames:
        t0 = time.perf_counter()
        predictor.predict([frame], threshold=0.3)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def run_edge_once(
    deploy: Path, video: Path, *, port: int, threads: int, frames: int, buffer_dir: Path
) -> tuple[list[tuple[float, dict]], float]:
    """Run ``detforge edge`` over the video with a subscriber on the output topic: (arrivals, wall s)."""
    import paho.mqtt.client as mqtt

    arrivals: list[tuple[float, dict]] = []
    done, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-subscriber-{time.time_ns()}")
    client.on_connect = lambda c, u, f, r, p: c.subscribe("detforge/infer/output", qos=1)
    client.on_subscribe = lambda c, u, m, r, p: subscribed.set()

    def on_message(c, u, message):
        arrivals.append((time.time(), json.loads(message.payload)))
        if len(arrivals) >= frames:
            done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        subscribed.wait(10)
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "detforge",
            "edge",
            str(deploy),
            "--source",
            str(video),
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--fps",
            "1000",
            "--threads",
            str(threads),
            "--buffer-dir",
            str(buffer_dir),
        ]
        edge = subprocess.run(command, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - started
        done.wait(10)
    finally:
        client.loop_stop()
        client.disconnect()
    if edge.returncode != 0:
        raise SystemExit(edge.stderr)
    return arrivals, wall


def parse_timestamp(ts: str) -> float:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import cv2

    from detforge.runtime import Predictor

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    bare: list[float] = []
    to_message: list[float] = []
    in_process: list[float] = []
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deploy = args.deploy or export_bench_deploy(
            REPO / "benchmarks" / "data" / f"deploy-mobilenet-v3-{args.size}", image_size=args.size
        )
        video = make_video(tmp / "clip.avi", args.frames)
        capture = cv2.VideoCapture(str(video))
        frames = []
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        port = free_port()
        config = tmp / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        broker = subprocess.Popen(
            [mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(0.5)
            # Bare model and edge runtime alternate, so that both see the same load on a shared machine;
            # each round's overhead is its edge p50 minus its own bare p50.
            for k in range(args.rounds):
                predictor = Predictor(str(deploy), threads=args.threads)
                time_bare(predictor, frames[:3])
                bare_round = time_bare(predictor, frames)
                del predictor
                arrivals, wall = run_edge_once(
                    deploy,
                    video,
                    port=port,
                    threads=args.threads,
                    frames=len(frames),
                    buffer_dir=tmp / f"buffer{k}",
                )
                f2m = [(arrived - parse_timestamp(m["timestamp"])) * 1000 for arrived, m in arrivals]
                span = arrivals[-1][0] - arrivals[0][0]
                rounds.append(
                    {
                        "bare_p50_ms": float(np.percentile(bare_round, 50)),
                        "f2m_p50_ms": float(np.percentile(f2m, 50)),
                        "fps": (len(arrivals) - 1) / span if span > 0 else float("nan"),
                        "messages": len(arrivals),
                        "wall_s": wall,
                    }
                )
                bare += bare_round
                to_message += f2m
                in_process += [m["latency_ms"] for _, m in arrivals]
        finally:
            broker.terminate()
            broker.wait(10)

    overheads = [r["f2m_p50_ms"] - r["bare_p50_ms"] for r in rounds]
    overhead = float(np.median(overheads))
    fps = float(np.median([r["fps"] for r in rounds]))
    bare_p50 = float(np.percentile(bare, 50))
    f2m_p50, f2m_p99 = float(np.percentile(to_message, 50)), float(np.percentile(to_message, 99))
    rows = [
        {
            "case": "bare Predictor, batch 1",
            "frames": len(bare),
            "p50_ms": round(bare_p50, 2),
            "p99_ms": round(float(np.percentile(bare, 99)), 2),
            "fps": round(1000 / float(np.mean(bare)), 1),
        },
        {
            "case": "edge: capture -> handed to MQTT (latency_ms)",
            "frames": len(in_process),
            "p50_ms": round(float(np.percentile(in_process, 50)), 2),
            "p99_ms": round(float(np.percentile(in_process, 99)), 2),
        },
        {
            "case": "edge: capture -> message at subscriber",
            "frames": len(to_message),
            "p50_ms": round(f2m_p50, 2),
            "p99_ms": round(f2m_p99, 2),
            "fps": round(fps, 1),
            "overhead_ms": round(overhead, 2),
        },
    ]
    for k, r in enumerate(rounds):
        rows.append(
            {
                "case": f"round {k + 1}",
                "bare_p50_ms": round(r["bare_p50_ms"], 2),
                "f2m_p50_ms": round(r["f2m_p50_ms"], 2),
                "overhead_ms": round(overheads[k], 2),
                "fps": round(r["fps"], 1),
                "messages": r["messages"],
                "process_wall_s": round(r["wall_s"], 1),
            }
        )
    venv = edge_venv()
    edge_mib = site_packages_mib(venv) if venv else float("nan")
    full_mib = site_packages_mib(REPO / ".venv")
    rows.append(
        {
            "case": "installed size (site-packages)",
            "edge_extra_mib": round(edge_mib, 1),
            "full_dev_venv_mib": round(full_mib, 1),
            "ratio": round(edge_mib / full_mib, 3),
        }
    )
    summary = (
        f"frame-to-message p50 {f2m_p50:.1f} ms vs bare model {bare_p50:.1f} ms; overhead (median "
        f"of {len(rounds)} alternating rounds) {overhead:+.1f} ms, target <= 5 ms; {fps:.1f} fps "
        f"sustained at batch 1; edge install {edge_mib:.0f} MiB vs full {full_mib:.0f} MiB"
    )
    title = f"detforge edge on this CPU ({args.size} px mobilenet-v3, {args.threads} threads, 640x360 video)"
    notes = (
        "The runtime, the broker and the subscriber share this machine's 2 CPU cores with other work; "
        "bare-model and edge runs alternate so that each round compares like with like."
    )
    write_result("edge", title=title, rows=rows, summary=summary, notes=notes)


if __name__ == "__main__":
    main()
