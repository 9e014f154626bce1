"""The edge runtime's publisher under faults, against a real mosquitto: is any result lost?

A "device" process (``DiskBuffer`` + ``Publisher``, what ``detforge edge`` runs; no model, the faults are
about delivery) publishes numbered results at ``--rate`` a second for ``--duration`` seconds, through a
TCP gate to the broker, while the bench injects, in turn:

- a broker restart (the gate cuts every connection, mosquitto stops and starts again);
- a device crash (SIGKILL mid-stream) and restart on the same buffer folder;
- damaged buffer files left where a crash or a bad disk leaves them (empty, cut short, garbage, a topic
  no one may publish to, a leftover ``.part``), written while the device is down.

A subscriber (listening before the device may reconnect) keeps every message. A result counts as
durable once the device's ``publish`` returned (the buffer fsync-ed it). Reported: durable results,
received, lost (durable, never received: must be 0), out of order (by ``seq``, first arrivals: must be
0), duplicates (QoS 1 is at least once; subscribers discard a repeated ``seq``), damaged files injected
and quarantined. A SIGKILL keeps the page cache, so this shows the recovery logic, not the disk's fsync.

    python benchmarks/bench_edge_faults.py [--duration 40] [--rate 20] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOPIC = "detforge/infer/output"
DEVICE = """
import sys, time
from detforge.edge.buffer import DiskBuffer, Publisher, parse_broker
url, folder, start, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
publisher = Publisher(parse_broker(url), DiskBuffer(folder), client_id=f"device-{start}",
                      status_topic="detforge/infer/status", status=lambda: {}, backoff=(0.05, 0.5))
publisher.start()
n = start
try:
    while True:
        seq = publisher.publish("detforge/infer/output", {"n": n})
        print(n, seq, flush=True)  # durable: the buffer has it on disk
        n += 1
        time.sleep(1.0 / rate)
except KeyboardInterrupt:
    publisher.close(drain_timeout=10)
"""
DAMAGE = [
    ("empty", b""),
    ("cut short", b'detforge/infer/output\n{"n": -1, "se'),
    ("garbage", bytes(range(256)) * 2),
    ("forbidden topic", b'detforge/infer/#\n{"n": -1}'),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


class Gate:
    """A TCP forwarder to the broker that can cut every connection and refuse new ones."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open_ = True
        self.pairs: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open_:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.open_ = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for sock in pairs:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Subscriber:
    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        self.client = None

    def connect(self) -> None:
        import paho.mqtt.client as mqtt

        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.monotonic_ns()}")
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()

        def on_message(c, u, message) -> None:
            with self.lock:
                self.messages.append(json.loads(message.payload))

        client.on_message = on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber could not subscribe")
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
            self.client = None


class Device:
    """The publishing process; ``durable`` collects (n, seq) as each publish returns."""

    def __init__(self, url: str, folder: Path, rate: float) -> None:
        self.url, self.folder, self.rate = url, folder, rate
        self.durable: list[tuple[int, int]] = []
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        start = self.durable[-1][0] + 1 if self.durable else 0
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.process = subprocess.Popen(
            [sys.executable, "-c", DEVICE, self.url, str(self.folder), str(start), str(self.rate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            n, seq = line.split()
            self.durable.append((int(n), int(seq)))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        time.sleep(0.1)  # the reader has the last lines

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)


def inject_damage(folder: Path) -> int:
    """Damaged files numbered after the newest in the buffer (what a crash can leave); returns how many."""
    seqs = [int(p.name.split(".")[0]) for p in [*folder.glob("*.msg"), *folder.glob("*.acked")]]
    try:
        seqs.append(int((folder / ".last-seq").read_text()))
    except (OSError, ValueError):
        pass
    last = max(seqs, default=0)
    for i, (_, data) in enumerate(DAMAGE, start=1):
        (folder / f"{last + i:012d}.msg").write_bytes(data)
    (folder / f".{last + len(DAMAGE) + 1:012d}.part").write_bytes(b'detforge/infer/output\n{"n": -1')
    return len(DAMAGE) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between faults")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="detforge-edge-faults-"))
    broker = Broker(work)
    broker.start()
    gate = Gate(broker.port)
    subscriber = Subscriber(broker.port)
    subscriber.connect()
    device = Device(f"mqtt://127.0.0.1:{gate.port}", work / "buffer", args.rate)
    device.start()
    faults = {"broker restart": 0, "device SIGKILL + restart": 0, "damaged files injected": 0}
    began = time.monotonic()
    kind = 0
    try:
        while time.monotonic() - began < args.duration:
            time.sleep(args.every)
            if kind % 2 == 0:  # the broker goes away for a second while the device keeps producing
                gate.close()
                subscriber.close()
                broker.stop()
                time.sleep(1.0)
                broker.start()
                subscriber.connect()  # listening before the device may come back
                gate.open_ = True
                faults["broker restart"] += 1
            else:  # the device dies mid-stream; what a crash can leave is put in its buffer
                device.kill()
                faults["damaged files injected"] += inject_damage(work / "buffer")
                device.start()
                faults["device SIGKILL + restart"] += 1
            kind += 1
        time.sleep(2.0)  # a quiet end: the backlog drains
        code = device.stop()
        time.sleep(1.0)
    finally:
        subscriber.close()
        gate.close()
        broker.stop()
    wall = time.monotonic() - began

    received: dict[int, dict] = {}
    order: list[int] = []
    duplicates = 0
    for message in subscriber.messages:
        if message["seq"] in received:
            duplicates += 1
            continue
        received[message["seq"]] = message
        order.append(message["seq"])
    durable = dict((seq, n) for n, seq in device.durable)
    lost = sorted(seq for seq in durable if seq not in received)
    wrong = sum(1 for seq, n in durable.items() if seq in received and received[seq]["n"] != n)
    out_of_order = sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)
    quarantine = work / "buffer" / "quarantine"
    quarantined = len(list(quarantine.iterdir())) if quarantine.is_dir() else 0
    left = len(list((work / "buffer").glob("*.msg")))
    shutil.rmtree(work, ignore_errors=True)
    injected = faults["damaged files injected"]
    ok = not lost and not wrong and not out_of_order and quarantined >= injected
    rows = [{"fault": name, "times": n} for name, n in faults.items()]
    rows += [
        {"fault": "results durable (publish returned)", "times": len(durable)},
        {"fault": "received (distinct seq)", "times": len(received)},
        {"fault": "lost", "times": len(lost)},
        {"fault": "wrong payload for its seq", "times": wrong},
        {"fault": "out of order (first arrivals)", "times": out_of_order},
        {"fault": "duplicates (QoS 1, discarded by seq)", "times": duplicates},
        {"fault": "quarantined: injected", "times": injected},
        {"fault": "quarantined: cut short by the device's crash", "times": quarantined - injected},
        {"fault": "left in the buffer at the end", "times": left},
    ]
    summary = (
        f"{wall:.0f} s at {args.rate:g} results/s: {faults['broker restart']} broker restarts, "
        f"{faults['device SIGKILL + restart']} device crashes, {faults['damaged files injected']} damaged "
        f"buffer files; {len(durable)} results durable, {len(received)} received, lost {len(lost)}, out of "
        f"order {out_of_order}, {duplicates} duplicates (QoS 1), {quarantined} quarantined ({injected} "
        f"injected, {quarantined - injected} writes cut short by a crash); device exit "
        f"{code}; {'nothing lost' if ok else 'FAILED'}"
    )
    write_result(
        "edge_faults",
        title="edge publisher under faults (mosquitto restarts, device SIGKILLs, damaged buffer files)",
        rows=rows,
        summary=summary,
        notes="The device is a detforge DiskBuffer + Publisher process (no model). A SIGKILL keeps the page "
        "cache, so this shows recovery, not the disk's fsync; the damaged files stand for what a power "
        "loss can leave. Results arriving twice are QoS 1's at-least-once, told apart by seq.",
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
