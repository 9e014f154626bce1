"""``detforge edge`` on this CPU: frame-to-message latency vs the bare model, sustained fps, install size.

Same model (mobilenet-v3 SSD, random init, exported at 320 px unless ``--deploy`` is given), same frames of
one 640x480 video, same ONNX Runtime thread count, in one run:
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
from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_video(path: Path, frames: int) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
    base = np.clip(rng.normal(120, 40, (480, 640, 3)), 0, 255).astype(np.uint8)
    for i in range(frames):
        writer.write(np.roll(base, 8 * i, axis=1))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=90)
    args = parser.parse_args()

    import cv2
    import paho.mqtt.client as mqtt

    from detforge.runtime import Predictor

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.deploy is None:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import export_tiny_deploy

            deploy = export_tiny_deploy(tmp / "deploy", image_size=args.size)
        else:
            deploy = args.deploy
        video = make_video(tmp / "clip.avi", args.frames)

        capture = cv2.VideoCapture(str(video))
        frames = []
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
        predictor = Predictor(str(deploy), threads=args.threads)
        for frame in frames[:3]:
            predictor.predict([frame], threshold=0.3)
        bare = []
        for frame in frames:
            t0 = time.perf_counter()
            predictor.predict([frame], threshold=0.3)
            bare.append((time.perf_counter() - t0) * 1000)
        del predictor

        port = free_port()
        config = tmp / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        broker = subprocess.Popen([mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        arrivals: list[tuple[float, dict]] = []
        done = threading.Event()
        try:
            time.sleep(0.5)
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
            subscribed = threading.Event()
            client.on_connect = lambda c, u, f, r, p: c.subscribe("detforge/infer/output", qos=1)
            client.on_subscribe = lambda c, u, m, r, p: subscribed.set()

            def on_message(c, u, message):
                arrivals.append((time.time(), json.loads(message.payload)))
                if len(arrivals) >= len(frames):
                    done.set()

            client.on_message = on_message
            client.connect("127.0.0.1", port)
            client.loop_start()
            subscribed.wait(10)
            started = time.perf_counter()
            command = [sys.executable, "-m", "detforge", "edge", str(deploy), "--source", str(video),
                       "--broker", f"mqtt://127.0.0.1:{port}", "--fps", "1000", "--threads",
                       str(args.threads), "--buffer-dir", str(tmp / "buffer")]
            edge = subprocess.run(command, capture_output=True, text=True, timeout=600)
            wall = time.perf_counter() - started
            done.wait(10)
            client.loop_stop()
            client.disconnect()
        finally:
            broker.terminate()
            broker.wait(10)
        if edge.returncode != 0:
            raise SystemExit(edge.stderr)

    def parse(ts: str) -> float:
        return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()

    to_message = [(arrived - parse(m["timestamp"])) * 1000 for arrived, m in arrivals]
    in_process = [m["latency_ms"] for _, m in arrivals]
    span = arrivals[-1][0] - arrivals[0][0]
    fps = (len(arrivals) - 1) / span if span > 0 else float("nan")
    bare_p50 = float(np.percentile(bare, 50))
    f2m_p50, f2m_p99 = float(np.percentile(to_message, 50)), float(np.percentile(to_message, 99))
    rows = [
        {"case": "bare Predictor, batch 1", "frames": len(bare), "p50_ms": round(bare_p50, 2),
         "p99_ms": round(float(np.percentile(bare, 99)), 2), "fps": round(1000 / float(np.mean(bare)), 1)},
        {"case": "edge: capture -> handed to MQTT (latency_ms)", "frames": len(in_process),
         "p50_ms": round(float(np.percentile(in_process, 50)), 2),
         "p99_ms": round(float(np.percentile(in_process, 99)), 2)},
        {"case": "edge: capture -> message at subscriber", "frames": len(to_message),
         "p50_ms": round(f2m_p50, 2), "p99_ms": round(f2m_p99, 2), "fps": round(fps, 1),
         "overhead_ms": round(f2m_p50 - bare_p50, 2), "process_wall_s": round(wall, 1)},
    ]
    venv = edge_venv()
    edge_mib = site_packages_mib(venv) if venv else float("nan")
    full_mib = site_packages_mib(REPO / ".venv")
    rows.append({"case": "installed size (site-packages)", "edge_extra_mib": round(edge_mib, 1),
                 "full_dev_venv_mib": round(full_mib, 1), "ratio": round(edge_mib / full_mib, 3)})
    summary = (f"frame-to-message p50 {f2m_p50:.1f} ms vs bare model {bare_p50:.1f} ms (overhead "
               f"{f2m_p50 - bare_p50:+.1f} ms, target <= 5 ms); {fps:.1f} fps sustained at batch 1; "
               f"edge install {edge_mib:.0f} MiB vs full {full_mib:.0f} MiB")
    title = f"detforge edge on this CPU ({args.size} px mobilenet-v3, {args.threads} threads, 640x480 video)"
    notes = ("The runtime, the broker and the subscriber share this machine's 2 CPU cores with other work; "
             "the bare model is timed in the same run just before.")
    write_result("edge", title=title, rows=rows, summary=summary, notes=notes)


if __name__ == "__main__":
    main()
