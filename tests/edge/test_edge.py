"""Tests for the edge runtime (detforge.edge, edge_sources, edge_buffer) against a real mosquitto broker.

Model-free parts (sources, allowed paths, the disk buffer, the publisher's ordering and exactly-once
flush after a broker restart) run without a model; the end-to-end tests run ``detforge edge`` in a
subprocess on a tiny exported model. A TCP ``Gate`` in front of the broker lets a test decide when the
runtime may reconnect, so the test's subscriber is listening before the buffered results are flushed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from detforge.edge.buffer import BrokerSpec, DiskBuffer, Publisher, parse_broker
from detforge.edge.sources import (
    LiveSource,
    VideoFileSource,
    WatchSource,
    open_source,
    parse_source,
    resolve_allowed_path,
)
from detforge.errors import ConfigError, StorageError

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """A subscriber on a real broker that keeps every message (topic, decoded JSON) in arrival order."""

    def __init__(
        self,
        port: int,
        topics: tuple[str, ...] = ("detforge/#",),
        *,
        ca_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.topics = topics
        self.login = (ca_file, username, password)
        self.messages: list[tuple[str, dict]] = []
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self.client: mqtt.Client | None = None

    def connect(self) -> Recorder:
        self._subscribed.clear()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"recorder-{time.monotonic_ns()}")

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe([(topic, 1) for topic in self.topics])

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            self._subscribed.set()

        def on_message(client, userdata, message):
            try:
                payload = json.loads(message.payload)
            except ValueError:
                payload = {"raw": message.payload}
            with self._condition:
                self.messages.append((message.topic, payload))
                self._condition.notify_all()

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        ca_file, username, password = self.login
        if ca_file:
            client.tls_set(ca_certs=ca_file)
        if username:
            client.username_pw_set(username, password)
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert self._subscribed.wait(10), "the recorder could not subscribe"
        self.client = client
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
            self.client = None

    def on(self, topic: str) -> list[dict]:
        with self._condition:
            return [payload for t, payload in self.messages if t == topic]

    def wait_for(self, topic: str, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while len([1 for t, _ in self.messages if t == topic]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
        return self.on(topic)

    def publish(self, topic: str, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        assert self.client is not None
        self.client.publish(topic, data, qos=1).wait_for_publish(10)


class Gate:
    """A TCP forwarder 127.0.0.1:port -> broker; ``close()`` cuts every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.open_ = True
        self.accepted = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open_:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        self.open_ = False
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def open(self) -> None:
        self.open_ = True

    def stop(self) -> None:
        self._running = False
        self.close()
        self.server.close()


def write_video(path: Path, *, frames: int = 10, fps: float = 10.0, size: tuple[int, int] = (96, 64)) -> Path:
    """A short MJPG video whose frame i is a flat gray of value 20*i (so frames are told apart)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 20 * i % 256, dtype=np.uint8))
    writer.release()
    return path


def write_image_atomically(folder: Path, name: str, value: int = 128) -> Path:
    """Write a PNG under a hidden name, then rename it into place (what the watch source expects)."""
    tmp = folder / f".{name}.part"
    Image.fromarray(np.full((48, 64, 3), value, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, folder / name)
    return folder / name


# -- sources -------------------------------------------------------------------------------------------


def test_parse_source_kinds(tmp_path):
    video = write_video(tmp_path / "v.avi", frames=2)
    assert parse_source("camera:0").kind == "camera" and parse_source("camera:0").target == 0
    assert parse_source("camera:12").target == 12
    assert parse_source("rtsp://cam.local:554/stream").kind == "stream"
    assert parse_source("HTTP://cam/mjpeg").kind == "stream"
    assert (parse_source(f"watch:{tmp_path}").kind, parse_source(f"watch:{tmp_path}").target) == (
        "watch",
        str(tmp_path),
    )
    assert (parse_source(str(video)).kind, parse_source(str(video)).target) == ("video", str(video))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty source"),
        ("camera:x", "camera index must be a number, got 'x'"),
        ("watch:/no/such/folder", "/no/such/folder, field 'source': the folder to watch does not exist"),
        ("/no/such/video.mp4", "/no/such/video.mp4, field 'source': no such video file"),
        ("s3://bucket/video.mp4", "cannot read frames from s3://bucket/video.mp4"),
    ],
)
def test_parse_source_refuses(text, message):
    with pytest.raises(ConfigError) as info:
        parse_source(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("fps", "expected"),
    [(5.0, [0, 2, 4, 6, 8]), (10.0, list(range(10))), (30.0, list(range(10))), (3.0, [0, 4, 7])],
)
def test_video_source_samples_by_the_video_timeline(tmp_path, fps, expected):
    source = open_source(str(write_video(tmp_path / "v.avi")), fps=fps)
    assert isinstance(source, VideoFileSource)
    frames = []
    while (frame := source.next_frame()) is not None:
        frames.append(frame)
    assert source.finished
    assert [f.index for f in frames] == expected
    assert frames[0].image.shape == (64, 96, 3) and frames[0].image.dtype == np.uint8
    # MJPG is lossy, but a flat gray stays within a couple of levels
    assert all(abs(float(f.image.mean()) - 20 * f.index) < 3 for f in frames)


def test_video_source_refuses_bad_fps(tmp_path):
    with pytest.raises(ConfigError, match="fps"):
        open_source(str(write_video(tmp_path / "v.avi", frames=1)), fps=0)


def test_live_source_hands_out_only_the_newest_frame(tmp_path):
    # a video file opened as a "live" source: the reader thread runs ahead, older frames are dropped
    source = LiveSource(str(write_video(tmp_path / "v.avi", frames=40, fps=100.0)), fps=1000.0)
    try:
        deadline = time.monotonic() + 10
        while source.read_count < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        frame = source.next_frame(timeout=1.0)
        assert frame is not None and frame.index == 39  # the newest, not the first
        assert source.next_frame(timeout=0.05) is None  # nothing newer: no repeats
        assert source.dropped == 39
    finally:
        source.close()


def test_watch_source_picks_up_new_images_only(tmp_path):
    write_image_atomically(tmp_path, "old.png")
    source = WatchSource(str(tmp_path), poll_s=0.02)
    assert source.next_frame(timeout=0.1) is None  # files present at start are not new
    write_image_atomically(tmp_path, "a.png", value=10)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    names, errors = [], {}
    deadline = time.monotonic() + 10
    while len(names) < 2 and time.monotonic() < deadline:
        frame = source.next_frame(timeout=0.2)
        if frame is not None:
            names.append(frame.index)
            errors[frame.index] = frame.error
            if frame.error is None:
                assert frame.image.shape == (48, 64, 3) and int(frame.image[0, 0, 0]) == 10
    assert sorted(names) == ["a.png", "broken.jpg"]
    assert errors["a.png"] is None
    assert "not a readable image" in errors["broken.jpg"]
    assert source.next_frame(timeout=0.1) is None  # each file once


# -- credentials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("rtsp://admin:s3cret@cam.local:554/stream", "rtsp://***@cam.local:554/stream"),
        ("rtsp://admin@cam.local/stream", "rtsp://***@cam.local/stream"),
        # everything before the authority's last "@" (ffmpeg's rule: a password may hold an "@")
        ("rtsp://admin:p@ss@cam/live?x=1", "rtsp://***@cam/live?x=1"),
        ("rtsp://admin:p@ss@cam:554", "rtsp://***@cam:554"),
        ("http://cam/cgi?loginuse=admin&loginpas=s3cret", "http://cam/cgi?loginuse=admin&loginpas=***"),
        (
            "http://cam/snap?usr=a&pw=s3cret&PIN=1234&Passwd=x",
            "http://cam/snap?usr=a&pw=***&PIN=***&Passwd=***",
        ),
        (
            "http://cam/v?api_key=k1&X-Amz-Signature=ab&keep=1",
            "http://cam/v?api_key=***&X-Amz-Signature=***&keep=1",
        ),
        ("rtsp://:s3cret@cam/stream", "rtsp://***@cam/stream"),
        (
            "http://cam/mjpeg?user=admin&password=s3cret&fps=5",
            "http://cam/mjpeg?user=admin&password=***&fps=5",
        ),
        ("https://cam/live?TOKEN=abc;x=1", "https://cam/live?TOKEN=***;x=1"),
        ("rtsp://cam.local:554/stream", "rtsp://cam.local:554/stream"),
        ("camera:0", "camera:0"),
        ("/data/videos/a@b.mp4", "/data/videos/a@b.mp4"),
        (
            "OpenCV cannot open rtsp://u:p@cam/s and rtsp://v:q@cam2/s",
            "OpenCV cannot open rtsp://***@cam/s and rtsp://***@cam2/s",
        ),
    ],
)
def test_mask_credentials(text, shown):
    from detforge.edge.sources import mask_credentials

    assert mask_credentials(text) == shown


def test_the_same_stream_with_another_password_is_the_same_buffer_folder(tmp_path):
    from detforge.edge import EdgeConfig, default_buffer_dir

    def folder(source):
        config = EdgeConfig(deploy_dir=str(tmp_path), broker="mqtt://127.0.0.1:1", source=source)
        return default_buffer_dir(config)

    first, second = folder("rtsp://admin:p@ss@cam/s?pw=1"), folder("rtsp://admin:other@cam/s?pw=2")
    assert first == second and os.path.basename(first) == "rtsp_____cam_s_pw____"
    assert "ss" not in os.path.basename(first).replace("rtsp", "")


def test_no_credentials_in_the_buffer_folder_name_or_errors(tiny_deploy, tmp_path):
    from detforge.edge import EdgeConfig, default_buffer_dir

    config = EdgeConfig(
        deploy_dir=str(tiny_deploy),
        broker="mqtt://127.0.0.1:1",
        source="rtsp://admin:s3cret@cam.local:554/stream?token=t0k",
    )
    assert config.public_source == "rtsp://***@cam.local:554/stream?token=***"
    assert os.path.basename(default_buffer_dir(config)) == "rtsp_____cam.local_554_stream_token____"
    with pytest.raises(ConfigError) as info:
        parse_broker("mqtt://user:s3cret@host:99999")
    assert str(info.value) == "field 'broker': bad port in broker URL 'mqtt://***@host:99999'"
    with pytest.raises(ConfigError) as info:
        parse_source("s3://KEY:s3cret@bucket/video.mp4")
    assert "s3cret" not in str(info.value) and "s3://***@bucket/video.mp4" in str(info.value)


# -- allowed paths -------------------------------------------------------------------------------------


def test_resolve_allowed_path(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    image = allowed / "sub" / "x.jpg"
    image.write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"s")
    os.symlink(tmp_path / "secret.jpg", allowed / "link.jpg")
    roots = (str(allowed),)
    assert resolve_allowed_path(str(image), roots) == str(image)
    assert resolve_allowed_path("sub/x.jpg", roots) == str(image)  # relative to the first allowed folder
    assert resolve_allowed_path(str(allowed / "sub" / ".." / "sub" / "x.jpg"), roots) == str(image)
    refused = {
        "/etc/passwd": "/etc/passwd: not inside an allowed folder (--allow-path), refused",
        str(allowed / ".." / "secret.jpg"): "not inside an allowed folder",
        "../secret.jpg": "../secret.jpg: not inside an allowed folder",
        str(allowed / "link.jpg"): "not inside an allowed folder",  # a symlink pointing outside
        str(allowed / "missing.jpg"): "missing.jpg: no such file",
        "s3://bucket/x.jpg": "only local files can be named here",
        "": "the file path must be a non-empty string",
    }
    for path, message in refused.items():
        with pytest.raises(StorageError) as info:
            resolve_allowed_path(path, roots)
        assert message in str(info.value), path
    with pytest.raises(StorageError, match="must be a non-empty string, got 42"):
        resolve_allowed_path(42, roots)
    with pytest.raises(StorageError, match="reading files named in requests is off"):
        resolve_allowed_path(str(image), ())


# -- broker URLs and the disk buffer -------------------------------------------------------------------


def test_parse_broker():
    assert parse_broker("mqtt://10.0.0.5:1884") == BrokerSpec("10.0.0.5", 1884)
    assert parse_broker("mqtt://broker") == BrokerSpec("broker", 1883)
    spec = parse_broker("mqtts://broker", username="u", password="p")
    assert (spec.port, spec.tls, spec.username, spec.password) == (8883, True, "u", "p")
    assert parse_broker("127.0.0.1:1999").port == 1999
    # every setting as `detforge edge` passes them, with an mqtts:// URL (this once raised a TypeError)
    spec = parse_broker(
        "mqtts://u:p@h",
        tls=False,
        ca_file=None,
        cert_file=None,
        key_file=None,
        username=None,
        password=None,
        mqtt_version="3.1.1",
    )
    assert spec == BrokerSpec("h", 8883, tls=True, username="u", password="p", mqtt_version="3.1.1")
    with pytest.raises(ConfigError, match="field 'mqtt_version': must be 5 or 3.1.1, got '4'"):
        parse_broker("mqtt://h", mqtt_version="4")
    for url, message in [
        ("http://x", "unsupported broker URL scheme 'http'"),
        ("mqtt://", "no host"),
        ("mqtt://h:99999", "bad port"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_broker(url)
    with pytest.raises(ConfigError, match="no such file"):
        parse_broker("mqtts://h", ca_file="/no/ca.pem")


def test_a_password_over_plain_mqtt_to_another_host_is_warned_about(tmp_path):
    from detforge.edge import plaintext_password_warning

    assert plaintext_password_warning(parse_broker("mqtt://dev:s3cret@10.0.0.5")) == (
        "the password for dev goes to 10.0.0.5:1883 in plain text; use mqtts:// (TLS)"
    )
    assert plaintext_password_warning(parse_broker("mqtt://10.0.0.5", username="dev", password="x"))
    assert plaintext_password_warning(parse_broker("mqtts://dev:s3cret@10.0.0.5")) is None  # TLS
    assert plaintext_password_warning(parse_broker("mqtt://dev:s3cret@10.0.0.5", tls=True)) is None
    for host in ("127.0.0.1", "localhost", "[::1]"):  # the password stays on the machine
        assert plaintext_password_warning(parse_broker(f"mqtt://dev:s3cret@{host}:1883")) is None
    assert plaintext_password_warning(parse_broker("mqtt://dev@10.0.0.5")) is None  # no password


def test_disk_buffer_is_bounded_ordered_and_survives_a_restart(tmp_path):
    buffer = DiskBuffer(str(tmp_path), max_messages=3)
    seqs = [buffer.append("t/a", f'{{"n": {i}}}'.encode()) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert buffer.pending() == [3, 4, 5] and buffer.dropped == 2  # the oldest went first
    assert buffer.read(4) == ("t/a", b'{"n": 3}')
    assert buffer.read(1) is None
    buffer.remove(4)
    assert buffer.pending() == [3, 5]
    assert sorted(os.listdir(tmp_path)) == ["000000000003.msg", "000000000005.msg"]
    buffer.close()
    again = DiskBuffer(str(tmp_path), max_messages=3)  # a new process finds the backlog, in order
    assert again.pending() == [3, 5] and again.next_seq() == 6
    again.remove(3)
    again.remove(5)
    again.save_seq()
    again.close()
    assert DiskBuffer(str(tmp_path)).next_seq() == 6  # numbering goes on after the buffer empties
    with pytest.raises(ConfigError, match="buffer_max"):
        DiskBuffer(str(tmp_path), max_messages=0)


def test_disk_buffer_never_reuses_a_number_after_a_crash(tmp_path):
    buffer = DiskBuffer(str(tmp_path))
    for i in range(3):
        buffer.append("t/a", f'{{"n": {i}}}'.encode())
    for seq in (1, 2, 3):  # every PUBACK arrived ...
        buffer.remove(seq)
    # ... and the process dies before save_seq(): the newest number stays on disk, nothing else
    buffer.close()
    assert sorted(os.listdir(tmp_path)) == ["000000000003.acked"]
    again = DiskBuffer(str(tmp_path))
    assert again.next_seq() == 4 and again.pending() == []
    again.append("t/a", b'{"n": 3}')
    again.remove(4)
    again.close()
    assert sorted(os.listdir(tmp_path)) == ["000000000004.acked"]  # one marker at a time
    (tmp_path / "000000000002.acked").write_bytes(b"")  # two markers: a crash between rename and unlink
    third = DiskBuffer(str(tmp_path))
    assert third.next_seq() == 5
    third.close()
    assert sorted(os.listdir(tmp_path)) == ["000000000004.acked"]
    again.save_seq()  # a clean stop: the number is in .last-seq, the marker goes
    assert sorted(os.listdir(tmp_path)) == [".last-seq"] and DiskBuffer(str(tmp_path)).next_seq() == 5


def test_disk_buffer_has_one_owner_and_survives_a_full_disk(tmp_path):
    folder = tmp_path / "buffer"
    buffer = DiskBuffer(str(folder))
    assert (tmp_path / "buffer.lock").read_text() == f"pid {os.getpid()}"
    with pytest.raises(ConfigError) as info:
        DiskBuffer(str(folder))  # a second owner, even in the same process
    assert str(info.value) == (
        f"{folder}, field 'buffer_dir': another detforge edge (pid {os.getpid()}) is "
        "using this buffer folder (give each runtime its own --buffer-dir)"
    )
    assert buffer.append("t/a", b'{"n": 0}') == 1
    # the next write lands on a full device: /dev/full answers every write with ENOSPC
    os.symlink("/dev/full", folder / ".000000000002.part")
    with pytest.raises(OSError, match="No space left on device"):
        buffer.append("t/a", b'{"n": 1}')
    assert buffer.write_errors == 1
    assert buffer.last_write_error == f"cannot write to the buffer folder {folder}: No space left on device"
    assert buffer.append("t/a", b'{"n": 2}') == 3  # the number of the lost write is not handed out again
    assert sorted(os.listdir(folder)) == ["000000000001.msg", "000000000003.msg"]  # no .part left behind
    buffer.close()
    assert not (tmp_path / "buffer.lock").exists()
    again = DiskBuffer(str(folder))  # the folder is free once its owner is gone
    assert again.pending() == [1, 3] and again.next_seq() == 4
    again.close()


def _damage(buffer_dir: Path) -> dict[str, bytes]:
    """What a power loss or a bad disk can leave in a buffer folder, by file name."""
    return {
        "000000000003.msg": b"",  # created, never written
        "000000000004.msg": b'detforge/infer/output\n{"n": 3, "se',  # cut mid-payload
        "000000000005.msg": bytes(range(256)) * 3,  # garbage, no topic line
        "000000000006.msg": b'detforge/infer/#\n{"n": 5}',  # a topic no one may publish to
        ".000000000009.part": b'detforge/infer/output\n{"n": 8',  # a write a crash cut short
    }


def test_disk_buffer_fsyncs_and_quarantines_what_cannot_be_read(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    buffer = DiskBuffer(str(tmp_path))
    buffer.append("t/a", b'{"n": 0}')
    # the message file, then the folder holding its new name
    assert synced == [str(tmp_path / ".000000000001.part"), str(tmp_path)]
    monkeypatch.setattr(os, "fsync", real_fsync)
    buffer.append("t/a", b'{"n": 1}')
    for name, data in _damage(tmp_path).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "000000000007.msg").write_bytes(b't/a\n{"n": 6}')
    buffer.close()
    again = DiskBuffer(str(tmp_path))
    assert again.quarantined == 1  # the leftover .part, at once
    assert again.pending() == [1, 2, 3, 4, 5, 6, 7]
    readable = {seq: again.read(seq) for seq in again.pending()}
    assert readable == {
        1: ("t/a", b'{"n": 0}'),
        2: ("t/a", b'{"n": 1}'),
        3: None,
        4: None,
        5: None,
        6: None,
        7: ("t/a", b'{"n": 6}'),
    }
    assert again.pending() == [1, 2, 7] and again.quarantined == 5
    assert sorted(os.listdir(tmp_path / "quarantine")) == sorted(_damage(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [
        "000000000001.msg",
        "000000000002.msg",
        "000000000007.msg",
        "quarantine",
    ]
    assert again.next_seq() == 10  # after the cut-short .part's 9: a number is never reused
    (tmp_path / "000000000007.msg").write_bytes(b"")  # damaged again later, under a name already seen
    (tmp_path / "000000000003.msg").write_bytes(b"")
    again.close()
    later = DiskBuffer(str(tmp_path))
    assert later.quarantined == 5  # the count survives a restart (the files do)
    assert [later.read(seq) for seq in later.pending()] == [
        ("t/a", b'{"n": 0}'),
        ("t/a", b'{"n": 1}'),
        None,
        None,
    ]
    assert later.quarantined == 7 and later.pending() == [1, 2]
    assert {"000000000003.msg", "000000000003.msg.2", "000000000007.msg"} <= set(
        os.listdir(tmp_path / "quarantine")
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty file"),
        (b'{"n": 1}', "no topic line"),
        (b"\xff\xfe\n{}", "the topic is not UTF-8"),
        (b"\n{}", "not a topic one can publish to: ''"),
        (b"a/+/b\n{}", "not a topic one can publish to: 'a/+/b'"),
        (b't\n{"n": 1', "the payload is not JSON (truncated?)"),
        (b"t\n", "the payload is not JSON (truncated?)"),
    ],
)
def test_message_problem(data, problem):
    from detforge.edge.buffer import message_problem

    assert message_problem(data).startswith(problem)
    assert message_problem(b't/a\n{"n": 1}') is None


# -- the publisher against a real broker ---------------------------------------------------------------


def _publisher(url: str, buffer_dir: Path, **kwargs) -> Publisher:
    status = {"frames": 0}
    return Publisher(
        parse_broker(url),
        DiskBuffer(str(buffer_dir)),
        client_id=f"pub-{time.monotonic_ns()}",
        status_topic="detforge/infer/status",
        status=lambda: dict(status),
        backoff=(0.05, 0.2),
        **kwargs,
    )


def _wait(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_publisher_flushes_the_backlog_once_and_in_order_after_a_broker_restart(mqtt_broker, tmp_path):
    gate = Gate(mqtt_broker.port)
    recorder = Recorder(mqtt_broker.port).connect()
    publisher = _publisher(gate.url, tmp_path / "buffer")
    topic = "detforge/infer/output"
    try:
        publisher.start()
        assert _wait(lambda: publisher.connected)
        for i in range(5):
            publisher.publish(topic, {"n": i})
        assert len(recorder.wait_for(topic, 5)) == 5
        assert _wait(lambda: len(publisher.buffer) == 0)  # every PUBACK came back
        gate.close()
        recorder.close()
        mqtt_broker.stop()
        assert _wait(lambda: not publisher.connected)
        for i in range(5, 12):  # produced while the broker is away: kept on disk
            publisher.publish(topic, {"n": i})
        assert sorted(os.listdir(tmp_path / "buffer")) == [
            "000000000005.acked",  # the newest acknowledged number, kept in case of a crash
            *(f"{seq:012d}.msg" for seq in range(6, 13)),
        ]
        mqtt_broker.start()
        recorder.connect()  # listening before the runtime may come back
        gate.open()
        received = recorder.wait_for(topic, 12)
        assert _wait(lambda: len(publisher.buffer) == 0)
        for i in range(12, 15):
            publisher.publish(topic, {"n": i})
        received = recorder.wait_for(topic, 15)
    finally:
        publisher.close(drain_timeout=5)
        recorder.close()
        gate.stop()
    assert [m["n"] for m in received] == list(range(15))  # each exactly once, in order
    assert [m["seq"] for m in received] == list(range(1, 16))
    assert publisher.connections == 2


def test_publisher_skips_damaged_files_and_loses_no_good_message_across_a_broker_restart(
    mqtt_broker, tmp_path
):
    buffer_dir = tmp_path / "buffer"
    old = DiskBuffer(str(buffer_dir))
    for n in (0, 1):
        old.append("detforge/infer/output", json.dumps({"n": n, "seq": n + 1}).encode())
    for name, data in _damage(buffer_dir).items():  # seq 3..6 and a .part for 9: a power loss's leftovers
        (buffer_dir / name).write_bytes(data)
    (buffer_dir / "000000000007.msg").write_bytes(b'detforge/infer/output\n{"n": 6, "seq": 7}')
    (buffer_dir / "000000000008.msg").write_bytes(b'detforge/infer/output\n{"n": 7, "seq": 8}')
    old.close()  # that run is over
    gate = Gate(mqtt_broker.port)
    recorder = Recorder(mqtt_broker.port).connect()
    publisher = _publisher(gate.url, buffer_dir)
    topic = "detforge/infer/output"
    try:
        publisher.start()
        assert len(recorder.wait_for(topic, 4)) == 4
        assert _wait(lambda: len(publisher.buffer) == 0)
        online = [m for m in recorder.wait_for("detforge/infer/status", 1) if m["status"] == "online"]
        assert online[0]["quarantined"] == 5 and online[0]["buffered"] == 4  # sent, PUBACKs not yet in
        gate.close()
        recorder.close()
        mqtt_broker.stop()
        assert _wait(lambda: not publisher.connected)
        seqs = [publisher.publish(topic, {"n": n}) for n in range(8, 13)]
        assert seqs == [10, 11, 12, 13, 14]  # after the .part's 9: a number is never reused
        (buffer_dir / "000000000012.msg").write_bytes(b"detforge/infer/output\n{")  # damaged while away
        mqtt_broker.start()
        recorder.connect()
        gate.open()
        received = recorder.wait_for(topic, 4 + 4)
        assert _wait(lambda: len(publisher.buffer) == 0)
        publisher.publish(topic, {"n": 13})
        received = recorder.wait_for(topic, 9)
        time.sleep(0.3)  # nothing else arrives late
        received = recorder.on(topic)
    finally:
        publisher.close(drain_timeout=5)
        recorder.close()
        gate.stop()
    assert [m["n"] for m in received] == [0, 1, 6, 7, 8, 9, 11, 12, 13]  # each good one once, in order
    assert [m["seq"] for m in received] == [1, 2, 7, 8, 10, 11, 13, 14, 15]
    assert publisher.buffer.quarantined == 6
    assert "000000000012.msg: the payload is not JSON" in publisher.last_error
    assert len(os.listdir(buffer_dir / "quarantine")) == 6


def test_publisher_sends_a_backlog_left_by_an_earlier_run_first(mqtt_broker, tmp_path):
    old = DiskBuffer(str(tmp_path / "buffer"))
    for i in range(3):
        old.append("detforge/infer/output", json.dumps({"n": i, "seq": i + 1}).encode())
    old.close()
    recorder = Recorder(mqtt_broker.port).connect()
    publisher = _publisher(mqtt_broker.url, tmp_path / "buffer")
    try:
        publisher.start()
        publisher.publish("detforge/infer/output", {"n": 3})
        received = recorder.wait_for("detforge/infer/output", 4)
        status = recorder.wait_for("detforge/infer/status", 1)
    finally:
        assert publisher.close(drain_timeout=5)
        recorder.close()
    assert [m["n"] for m in received] == [0, 1, 2, 3] and received[-1]["seq"] == 4
    assert status[0]["status"] == "online" and status[0]["client_id"] == publisher.client_id
    assert os.listdir(tmp_path / "buffer") == [".last-seq"]


def test_publisher_close_without_a_broker_keeps_the_results(tmp_path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"mqtt://127.0.0.1:{port.getsockname()[1]}"  # bound, not listening: connections are refused
    publisher = _publisher(url, tmp_path / "buffer")
    publisher.start()
    publisher.publish("detforge/infer/output", {"n": 0})
    assert publisher.close(drain_timeout=0.3) is False
    port.close()
    assert "cannot connect to 127.0.0.1" in publisher.last_error
    assert DiskBuffer(str(tmp_path / "buffer")).pending() == [1]


# -- TLS, passwords and an ACL on a real mosquitto ------------------------------------------------------


@pytest.fixture
def secure_broker(tmp_path):
    """mosquitto with TLS (a CA and a server certificate made here), a password file and an ACL.

    Users: ``dev`` / ``s3cret`` may read and write ``detforge/infer/#`` and nothing else.
    """
    import getpass

    from conftest import Broker, need_binary

    binary = need_binary("mosquitto", "/usr/sbin/mosquitto")
    openssl = need_binary("openssl")
    passwd = need_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    folder = tmp_path / "secure"
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run(args, cwd=folder, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        run(
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=detforge test {ca}",
        )
    run(
        openssl,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        openssl,
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    run(passwd, "-b", "-c", "passwd", "dev", "s3cret")
    (folder / "acl").write_text("user dev\ntopic readwrite detforge/infer/#\n")
    broker = Broker(binary, folder)
    broker.config.write_text(
        f"listener {broker.port} 127.0.0.1\n"
        f"cafile {folder / 'ca.pem'}\ncertfile {folder / 'server.pem'}\nkeyfile {folder / 'server.key'}\n"
        f"allow_anonymous false\npassword_file {folder / 'passwd'}\nacl_file {folder / 'acl'}\n"
        # as root mosquitto would switch to the `mosquitto` user, who cannot read this test's key files
        f"persistence false\nuser {getpass.getuser()}\n"
    )
    broker.ca_file = str(folder / "ca.pem")
    broker.other_ca_file = str(folder / "other-ca.pem")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _secure_publisher(broker, buffer_dir: Path, **login) -> Publisher:
    spec = parse_broker(f"mqtts://127.0.0.1:{broker.port}", **{"ca_file": broker.ca_file, **login})
    return Publisher(
        spec,
        DiskBuffer(str(buffer_dir)),
        client_id=f"pub-{time.monotonic_ns()}",
        status_topic="detforge/infer/status",
        status=lambda: {},
        backoff=(0.05, 0.2),
    )


def test_tls_with_a_password_publishes_and_the_acl_refuses_other_topics(secure_broker, tmp_path):
    recorder = Recorder(
        secure_broker.port,
        ("detforge/infer/#",),
        ca_file=secure_broker.ca_file,
        username="dev",
        password="s3cret",
    ).connect()
    publisher = _secure_publisher(secure_broker, tmp_path / "buffer", username="dev", password="s3cret")
    try:
        publisher.start()
        assert _wait(lambda: publisher.connected), publisher.last_error
        publisher.publish("detforge/infer/output", {"n": 0})
        publisher.publish("detforge/elsewhere", {"n": 1})  # outside the ACL
        publisher.publish("detforge/infer/output", {"n": 2})
        received = recorder.wait_for("detforge/infer/output", 2)
        assert _wait(lambda: len(publisher.buffer) == 0)
    finally:
        publisher.close(drain_timeout=5)
        recorder.close()
    assert [(m["n"], m["seq"]) for m in received] == [(0, 1), (2, 3)]
    assert publisher.last_error == "quarantined 000000000002.msg: the broker refused it: Not authorized"
    assert publisher.buffer.quarantined == 1
    assert os.listdir(tmp_path / "buffer" / "quarantine") == ["000000000002.msg"]
    assert [m["status"] for m in recorder.on("detforge/infer/status")][0] == "online"


@pytest.mark.parametrize(
    ("login", "error"),
    [
        (
            {"username": "dev", "password": "wrong"},
            "broker refused the connection: Not authorized (check --username and the password, and the "
            "broker's password file)",
        ),
        ({}, "broker refused the connection: Not authorized"),
        (
            {"username": "dev", "password": "s3cret", "mqtt_version": "3.1.1", "ca_file": "OTHER"},
            "CERTIFICATE_VERIFY_FAILED",
        ),
    ],
)
def test_tls_refuses_wrong_credentials_with_a_clear_error(secure_broker, tmp_path, login, error):
    if login.get("ca_file") == "OTHER":
        login["ca_file"] = secure_broker.other_ca_file  # a CA that did not sign the server's certificate
    publisher = _secure_publisher(secure_broker, tmp_path / "buffer", **login)
    publisher.start()
    publisher.publish("detforge/infer/output", {"n": 0})
    try:
        assert _wait(lambda: publisher.last_error is not None, timeout=10)
        time.sleep(0.3)
    finally:
        kept = publisher.close(drain_timeout=0.2)
    assert error in publisher.last_error and publisher.connections == 0
    assert kept is False and DiskBuffer(str(tmp_path / "buffer")).pending() == [1]  # kept for later


def test_edge_command_over_tls_with_a_password_from_the_environment(tiny_deploy, secure_broker, tmp_path):
    recorder = Recorder(
        secure_broker.port,
        ("detforge/infer/#",),
        ca_file=secure_broker.ca_file,
        username="dev",
        password="s3cret",
    ).connect()
    url = f"mqtts://127.0.0.1:{secure_broker.port}"
    login = ("--ca-file", secure_broker.ca_file, "--username", "dev")
    os.environ["DETFORGE_MQTT_PASSWORD"] = "s3cret"
    try:
        process = start_edge(tiny_deploy, url, tmp_path, *login)
    finally:
        del os.environ["DETFORGE_MQTT_PASSWORD"]
    try:
        online = wait_online(recorder, process)
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
        wrong = start_edge(tiny_deploy, url, tmp_path, *login, "--password", "wrong")
        # wait for what it says rather than a fixed time: on a loaded machine start-up takes seconds
        said = read_until(wrong, "MQTT: broker refused the connection")
        time.sleep(0.5)
        assert wrong.poll() is None, said  # it keeps trying (the broker may be fixed), and says why
        wrong.send_signal(signal.SIGTERM)
        wrong_code, rest = finish(wrong)
        wrong_output = said + rest
    finally:
        recorder.close()
    assert code == 0, output
    assert online["mqtt_error"] is None
    assert wrong_code == 0
    assert "MQTT: broker refused the connection: Not authorized (check --username" in wrong_output
    assert "wrong" not in wrong_output.replace("--password", "")


# -- the runtime end to end (a subprocess on a tiny exported model) -----------------------------------

OUTPUT, STATUS, INPUT = "detforge/infer/output", "detforge/infer/status", "detforge/infer/input"


def start_edge(deploy: Path, broker_url: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "edge",
            str(deploy),
            "--broker",
            broker_url,
            "--buffer-dir",
            str(tmp_path / "buffer"),
            "--threads",
            "1",
            "--reconnect-max",
            "0.5",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(process: subprocess.Popen, marker: str, timeout: float = 60) -> str:
    """The process's output up to and including the first line holding ``marker`` (or all it said)."""
    import threading

    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return "".join(lines)


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, process.stdout.read()


def wait_online(recorder: Recorder, process: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        online = [m for m in recorder.on(STATUS) if m["status"] == "online"]
        if online:
            return online[-1]
        assert process.poll() is None, finish(process)[1]
        time.sleep(0.05)
    raise AssertionError("the runtime never said it is online")


def test_video_source_publishes_one_valid_message_per_sampled_frame(tiny_deploy, mqtt_broker, tmp_path):
    from detforge.runtime import Predictor

    video = write_video(tmp_path / "clip.avi", frames=10, fps=10.0)
    recorder = Recorder(mqtt_broker.port).connect()
    try:
        process = start_edge(
            tiny_deploy,
            mqtt_broker.url,
            tmp_path,
            "--source",
            str(video),
            "--fps",
            "5",
            "--threshold",
            "0.3",
            "--save-every",
            "2",
            "--save-dir",
            str(tmp_path / "saved"),
        )
        code, output = finish(process)
        messages = recorder.wait_for(OUTPUT, 5, timeout=5)
        statuses = recorder.wait_for(STATUS, 2, timeout=5)
    finally:
        recorder.close()
    assert code == 0, output
    assert "5 frames, 0 requests, 5 results published, 0 errors, 0 still buffered" in output
    assert [m["frame"] for m in messages] == [0, 2, 4, 6, 8]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5]
    predictor = Predictor(str(tiny_deploy))
    capture = cv2.VideoCapture(str(video))
    frames = [capture.read()[1][:, :, ::-1] for _ in range(10)]
    for message in messages:
        assert set(message) == {"timestamp", "source", "frame", "prediction", "latency_ms", "seq"}
        assert message["source"] == str(video)
        assert message["timestamp"].endswith("Z") and len(message["timestamp"]) == 27
        assert 0 < message["latency_ms"] < 60_000
        expected = predictor.predict([np.ascontiguousarray(frames[message["frame"]])], threshold=0.3)[0]
        assert message["prediction"] == json.loads(json.dumps(expected.to_sagemaker()))
    assert statuses[0]["status"] == "online" and statuses[-1]["status"] == "offline"
    assert statuses[-1]["frames"] == 5 and statuses[-1]["source"] == str(video)
    assert sorted(os.listdir(tmp_path / "saved")) == ["frame_000002.jpg", "frame_000006.jpg"]
    assert cv2.imread(str(tmp_path / "saved" / "frame_000002.jpg")).shape == (64, 96, 3)
    assert os.listdir(tmp_path / "buffer") == [".last-seq"]  # everything acknowledged


def test_requests_answer_allowed_files_and_refuse_the_rest(tiny_deploy, mqtt_broker, tmp_path):
    from detforge.runtime import Predictor

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    image = write_image_atomically(allowed, "in.png", value=200)
    (tmp_path / "outside.png").write_bytes(image.read_bytes())
    recorder = Recorder(mqtt_broker.port).connect()
    process = start_edge(tiny_deploy, mqtt_broker.url, tmp_path, "--allow-path", str(allowed))
    try:
        wait_online(recorder, process)
        requests = [
            {"filepath": str(image), "id": "ok"},
            {"filepath": "/etc/passwd", "id": "passwd"},
            {"filepath": str(allowed / ".." / "outside.png"), "id": "dotdot"},
            {"filepath": "../outside.png", "id": "relative"},
            {"filepath": str(allowed / "nope.png"), "id": "missing"},
            {"file": "x", "id": "shape"},
        ]
        for request in requests:
            recorder.publish(INPUT, request)
        recorder.publish(INPUT, b"not json at all")
        answers = recorder.wait_for(OUTPUT, len(requests) + 1)
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
        recorder.close()
    assert code == 0, output
    by_id = {a.get("id", "none"): a for a in answers}
    expected = Predictor(str(tiny_deploy)).predict([str(image)], threshold=0.3)[0].to_sagemaker()
    assert by_id["ok"]["prediction"] == json.loads(json.dumps(expected))
    assert by_id["ok"]["frame"] == str(image) and by_id["ok"]["source"] == "request"
    assert by_id["passwd"]["error"] == "/etc/passwd: not inside an allowed folder (--allow-path), refused"
    assert "not inside an allowed folder" in by_id["dotdot"]["error"]
    assert (
        by_id["relative"]["error"] == "../outside.png: not inside an allowed folder (--allow-path), refused"
    )
    assert by_id["missing"]["error"].endswith("nope.png: no such file")
    assert by_id["shape"]["error"] == 'a request is a JSON object {"filepath": "..."}'
    assert by_id["none"]["error"] == 'a request is a JSON object {"filepath": "..."}'
    assert all("prediction" not in a for key, a in by_id.items() if key != "ok")
    assert "0 frames, 7 requests, 1 results published" in output


def test_broker_restart_every_result_arrives_once_in_order(tiny_deploy, mqtt_broker, tmp_path):
    watched = tmp_path / "incoming"
    watched.mkdir()
    gate = Gate(mqtt_broker.port)
    recorder = Recorder(mqtt_broker.port).connect()
    process = start_edge(tiny_deploy, gate.url, tmp_path, "--source", f"watch:{watched}")
    buffered = lambda: [n for n in os.listdir(tmp_path / "buffer") if n.endswith(".msg")]  # noqa: E731
    try:
        wait_online(recorder, process)
        for i in range(3):
            write_image_atomically(watched, f"img{i}.png", value=40 * i)
            time.sleep(0.05)  # distinct mtimes: files are taken oldest first
        assert len(recorder.wait_for(OUTPUT, 3)) == 3
        assert _wait(lambda: not buffered())  # all acknowledged before the broker goes
        gate.close()
        recorder.close()
        mqtt_broker.stop()
        for i in range(3, 7):
            write_image_atomically(watched, f"img{i}.png", value=40 * i)
            time.sleep(0.05)
        assert _wait(lambda: len(buffered()) == 4), "results made while the broker is down wait on disk"
        mqtt_broker.start()
        recorder.connect()
        gate.open()
        received = recorder.wait_for(OUTPUT, 7)
        assert _wait(lambda: not buffered())
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
        recorder.close()
        gate.stop()
    assert code == 0, output
    assert [m["frame"] for m in received] == [f"img{i}.png" for i in range(7)]
    assert [m["seq"] for m in received] == list(range(1, 8))
    assert all(isinstance(m["prediction"], list) for m in received)


def test_a_stream_with_credentials_never_shows_them_and_uses_the_default_threshold(
    tiny_deploy, mqtt_broker, tmp_path
):
    """A stream URL with a password: no message, status or log line carries it; no --threshold: the
    deploy folder's default_threshold is used (as predict and serve do)."""
    import functools
    import http.server
    import shutil

    from detforge.runtime import Predictor

    site = tmp_path / "site"
    site.mkdir()
    video = site / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    frame = np.full((64, 64, 3), 110, dtype=np.uint8)
    frame[16:48, 20:44] = (210, 70, 40)  # BGR: a blue box, what the tiny model was trained on
    for _ in range(20):
        writer.write(frame)
    writer.release()
    decoded = np.ascontiguousarray(cv2.VideoCapture(str(video)).read()[1][:, :, ::-1])
    # a default_threshold that gives another answer than the old fixed 0.3 would
    raw = Predictor(str(tiny_deploy)).predict([decoded], threshold=0.0)[0]
    scores = [row[1] for row in raw.to_sagemaker()]
    default = round(max(scores) + 0.001, 6) if max(scores) >= 0.3 else 0.0
    deploy = tmp_path / "deploy"
    shutil.copytree(tiny_deploy, deploy)
    meta = json.loads((deploy / "model.json").read_text())
    meta["default_threshold"] = default
    (deploy / "model.json").write_text(json.dumps(meta))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://admin:s3cret@127.0.0.1:{server.server_address[1]}/clip.avi?password=hunter2"
    recorder = Recorder(mqtt_broker.port).connect()
    process = start_edge(deploy, mqtt_broker.url, tmp_path, "--source", url, "--fps", "20")
    try:
        online = wait_online(recorder, process)
        messages = recorder.wait_for(OUTPUT, 3)
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
        recorder.wait_for(STATUS, 2, timeout=5)
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "detforge",
                "edge",
                str(deploy),
                "--broker",
                mqtt_broker.url,
                "--buffer-dir",
                str(tmp_path / "buffer2"),
                "--source",
                "rtsp://admin:s3cret@127.0.0.1:1/x",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if process.poll() is None:
            process.kill()
        recorder.close()
        server.shutdown()
    assert code == 0, output
    shown = f"http://***@127.0.0.1:{server.server_address[1]}/clip.avi?password=***"
    assert online["source"] == shown and online["threshold"] == default
    assert len(messages) >= 3 and {m["source"] for m in messages} == {shown}
    expected = Predictor(str(deploy)).predict([decoded])[0].to_sagemaker()
    assert all(m["prediction"] == json.loads(json.dumps(expected)) for m in messages)
    assert expected != Predictor(str(deploy)).predict([decoded], threshold=0.3)[0].to_sagemaker()
    everything = json.dumps(recorder.messages, default=str) + output + refused.stdout + refused.stderr
    assert "s3cret" not in everything and "hunter2" not in everything and "admin" not in everything
    assert refused.returncode != 0 and "rtsp://***@127.0.0.1:1/x" in refused.stderr


def test_a_second_runtime_on_the_same_buffer_folder_is_refused_naming_the_first(
    tiny_deploy, mqtt_broker, tmp_path
):
    """Two runtimes without --source share the default folder (edge-buffer/requests): the second is
    refused at start with one line naming the first's pid; the first keeps numbering and answering."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    image = write_image_atomically(allowed, "in.png", value=200)
    command = [
        sys.executable,
        "-m",
        "detforge",
        "edge",
        str(tiny_deploy),
        "--broker",
        mqtt_broker.url,
        "--threads",
        "1",
        "--allow-path",
        str(allowed),
    ]
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # the default buffer folder, under a test home
    folder = tmp_path / "home" / ".cache" / "detforge" / "edge-buffer" / "requests"
    recorder = Recorder(mqtt_broker.port).connect()
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_online(recorder, first)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        recorder.publish(INPUT, {"filepath": str(image), "id": "after"})
        answers = recorder.wait_for(OUTPUT, 1)
        first.send_signal(signal.SIGTERM)
        code, output = finish(first)
    finally:
        if first.poll() is None:
            first.kill()
        recorder.close()
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.strip().splitlines() == [
        f"error: {folder}, field 'buffer_dir': another detforge edge (pid {first.pid}) is using this "
        "buffer folder (give each runtime its own --buffer-dir)"
    ]
    assert code == 0, output
    assert [(a["id"], a["seq"]) for a in answers] == [("after", 1)] and "prediction" in answers[0]
    assert sorted(os.listdir(folder)) == [".last-seq"] and not folder.with_name("requests.lock").exists()


def test_a_full_disk_is_reported_and_survived(tiny_deploy, mqtt_broker, tmp_path):
    """The runtime's file writes fail (RLIMIT_FSIZE 0 set on the live process: EFBIG, as ENOSPC on a full
    disk): connected, results go out without a copy on disk; disconnected, they are lost and counted; once
    writes work again results are buffered and sent after the reconnect. The runtime never stops."""
    import resource

    watched = tmp_path / "incoming"
    watched.mkdir()
    gate = Gate(mqtt_broker.port)
    recorder = Recorder(mqtt_broker.port).connect()
    process = start_edge(tiny_deploy, gate.url, tmp_path, "--source", f"watch:{watched}")
    buffered = lambda: [n for n in os.listdir(tmp_path / "buffer") if n.endswith(".msg")]  # noqa: E731
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        wait_online(recorder, process)
        write_image_atomically(watched, "img0.png", value=10)
        assert len(recorder.wait_for(OUTPUT, 1)) == 1
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (0, limits[1]))  # the disk is full from now on
        write_image_atomically(watched, "img1.png", value=50)
        assert len(recorder.wait_for(OUTPUT, 2)) == 2  # connected: sent without a copy on disk
        gate.close()
        said = read_until(process, "connection lost")
        write_image_atomically(watched, "img2.png", value=90)
        said += read_until(process, "made while disconnected are lost")
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, limits)  # space again
        write_image_atomically(watched, "img3.png", value=130)
        assert _wait(lambda: len(buffered()) == 1), "with space again, a result waits on disk"
        gate.open()
        received = recorder.wait_for(OUTPUT, 3)
        assert _wait(lambda: not buffered())
        process.send_signal(signal.SIGTERM)
        code, output = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
        recorder.close()
        gate.stop()
    assert code == 0, said + output
    assert [(m["frame"], m["seq"]) for m in received] == [("img0.png", 1), ("img1.png", 2), ("img3.png", 4)]
    buffer_dir = tmp_path / "buffer"
    assert (
        f"MQTT: cannot write to the buffer folder {buffer_dir}: File too large; results are sent "
        "without a copy on disk" in said
    )
    assert (
        f"MQTT: cannot write to the buffer folder {buffer_dir}: File too large; results made while "
        "disconnected are lost" in said
    )
    last = recorder.on(STATUS)[-1]
    counts = (last["status"], last["buffer_write_errors"], last["unbuffered"], last["lost"])
    assert counts == ("offline", 2, 1, 1)
    assert output.strip().endswith("1 lost (the buffer folder could not be written)")


def test_sigkill_makes_the_broker_publish_the_last_will(tiny_deploy, mqtt_broker, tmp_path):
    recorder = Recorder(mqtt_broker.port).connect()
    process = start_edge(tiny_deploy, mqtt_broker.url, tmp_path)
    try:
        online = wait_online(recorder, process)
        assert online["model"] and online["frames"] == 0 and online["last_error"] is None
        process.kill()
        process.wait(10)
        assert _wait(lambda: recorder.on(STATUS)[-1]["status"] == "offline", timeout=10)
    finally:
        recorder.close()
    assert recorder.on(STATUS)[-1]["client_id"] == online["client_id"]


def test_edge_refuses_bad_settings(tiny_deploy, tmp_path):
    from detforge.edge import EdgeConfig

    for kwargs, message in [
        ({"threshold": 2.0}, "threshold"),
        ({"fps": 0}, "fps"),
        ({"save_every": -1}, "save_every"),
        ({"allow_paths": (str(tmp_path / "nope"),)}, "not a folder"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EdgeConfig(deploy_dir=str(tiny_deploy), broker="mqtt://127.0.0.1:1", **kwargs)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "edge",
            str(tiny_deploy),
            "--broker",
            "mqtt://127.0.0.1:1",
            "--source",
            "camera:x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "error: field 'source': camera index must be a number, got 'x' (e.g. camera:0)" in result.stderr


def test_edge_run_options_are_the_edge_config_fields_with_the_same_defaults():
    """The options of `detforge edge run` and EdgeConfig's fields match one to one (OPTION_FIELDS names
    the renamed ones), defaults included, and the CLI builds the config from its parsed options alone."""
    import dataclasses

    import typer

    from detforge.cli import build_app
    from detforge.cli.edge import OPTION_FIELDS, config_fields
    from detforge.edge import EdgeConfig

    command = typer.main.get_command(build_app()).commands["edge"].commands["run"]
    params = {param.name: param for param in command.params}
    fields = {field.name: field for field in dataclasses.fields(EdgeConfig)}
    assert sorted(OPTION_FIELDS.get(name, name) for name in params) == sorted(fields)
    for name, param in params.items():
        field = fields[OPTION_FIELDS.get(name, name)]
        if field.default is dataclasses.MISSING:
            assert param.required, name
        else:
            default = tuple(param.default or ()) if name == "allow_path" else param.default
            assert (name, default) == (name, field.default)
    parsed = {name: param.default for name, param in params.items()}
    parsed.update(deploy="deploy/model.onnx", broker="mqtt://127.0.0.1:1883", allow_path=None)
    assert config_fields(parsed) == {
        **{f: fields[f].default for f in fields if fields[f].default is not dataclasses.MISSING},
        "deploy_dir": "deploy",
        "broker": "mqtt://127.0.0.1:1883",
    }
