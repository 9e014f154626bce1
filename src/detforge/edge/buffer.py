"""Getting the edge runtime's results to the MQTT broker, in order, without losing them.

In here: ``parse_broker`` (``mqtt://`` / ``mqtts://`` URLs), ``DiskBuffer`` (a bounded FIFO of messages on
disk, one file per sequence number) and ``Publisher``, which owns the paho-mqtt client.

How nothing is lost: every result gets the next sequence number and is written to the buffer *before* it is
published (QoS 1); its file is removed only when the broker's PUBACK for it arrives. When the connection
drops, the client is thrown away with whatever paho still held, and a new one connects with a growing pause
(0.5 s doubling to 30 s); once connected it sends every buffered message in sequence order before any new
one. So each result reaches the broker at least once and in order; QoS 1 may repeat a message whose PUBACK
was lost in the drop, which subscribers can discard by its ``seq``. The buffer is bounded: when full, the
oldest result is dropped (and counted). Writes are fsync-ed (file and folder), so a power loss leaves each
message whole or absent; a file that still cannot be published (empty, truncated, garbage) is moved to
``quarantine/`` and counted, and the ones behind it go out. A number is never reused, even after a crash
with an empty buffer (the newest acknowledged file becomes ``<seq>.acked``). One runtime owns a buffer
folder (``<folder>.lock`` beside it, an exclusive ``flock`` naming its pid, as ``detforge label``'s): a
second one on the same folder is refused instead of the two handing out the same numbers. A write that
fails (a full disk) costs that one result its place on disk, never the runtime: it is sent straight away
when connected, else counted as lost, and the status says so. Not in here: frames, the model, the main
loop (``detforge.edge``). No torch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from detforge.errors import ConfigError
from detforge.storage import FileLock, fsync_dir, mask_credentials

log = logging.getLogger("detforge.edge")
SEQ_FILE = ".last-seq"
ACKED = ".acked"  # the newest acknowledged message keeps its number on disk under this suffix
MQTT_VERSIONS = ("5", "3.1.1")


@dataclass(frozen=True)
class BrokerSpec:
    """Where and how to connect: host, port, TLS files, user name and password."""

    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    mqtt_version: str = "5"  # 5: the broker says which message it refused (e.g. a topic outside its ACL)


def parse_broker(url: str, **settings) -> BrokerSpec:
    """``mqtt://HOST[:PORT]`` (1883) or ``mqtts://HOST[:PORT]`` (8883, TLS); ``settings`` fill the rest."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    shown = mask_credentials(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(
            f"unsupported broker URL scheme {parts.scheme!r}",
            field="broker",
            hint="use mqtt://HOST:1883 or mqtts://HOST:8883",
        )
    if not parts.hostname:
        raise ConfigError(
            f"no host in broker URL {shown!r}", field="broker", hint="e.g. mqtt://127.0.0.1:1883"
        )
    version = str(settings.pop("mqtt_version", None) or "5")
    if version not in MQTT_VERSIONS:
        raise ConfigError(f"must be 5 or 3.1.1, got {version!r}", field="mqtt_version")
    wants_tls = bool(settings.pop("tls", False))  # popped first: an mqtts:// URL must not leave it behind
    tls = parts.scheme in ("mqtts", "ssl") or wants_tls
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"bad port in broker URL {shown!r}", field="broker") from exc
    username = settings.pop("username", None) or parts.username
    password = settings.pop("password", None) or parts.password
    for name in ("ca_file", "cert_file", "key_file"):
        path = settings.get(name)
        if path and not os.path.isfile(path):
            raise ConfigError("no such file", path=path, field=name.replace("_", "-"))
    return BrokerSpec(
        parts.hostname,
        port,
        tls=tls or any(settings.get(k) for k in ("ca_file", "cert_file")),
        username=username,
        password=password,
        mqtt_version=version,
        **settings,
    )


QUARANTINE = "quarantine"
TOPIC_MAX_BYTES = 65535  # MQTT's limit for a topic name


class DiskBuffer:
    """Messages waiting for their PUBACK, one file each (``<seq>.msg``: topic line, then a JSON payload).

    Durable: a message is written to a hidden temp file, flushed and ``fsync``-ed, renamed into place and
    the folder ``fsync``-ed before ``append`` returns, so after a power loss a message is either whole or
    absent. A file that still cannot be read back (empty, truncated, garbage, a leftover ``.part``) is
    moved to ``quarantine/`` beside the messages and counted in ``quarantined``; it never blocks the ones
    behind it.
    """

    def __init__(self, directory: str, *, max_messages: int = 10000) -> None:
        if max_messages < 1:
            raise ConfigError(f"must be at least 1, got {max_messages}", field="buffer_max")
        self.directory = directory
        self.max_messages = max_messages
        self.dropped = 0
        self.write_errors = 0  # appends that could not be written (a full disk)
        self.last_write_error: str | None = None
        self.last_quarantine_reason: str | None = None
        self._lock = threading.Lock()
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the buffer folder: {exc.strerror or exc}", path=directory, field="buffer_dir"
            ) from None
        # before anything is read: the .part files of a runtime that is still writing are not leftovers
        self._owner = FileLock(os.path.normpath(os.path.abspath(directory)) + ".lock")
        holder = self._owner.acquire()
        if holder is not None:
            raise ConfigError(
                f"another detforge edge ({holder}) is using this buffer folder",
                path=directory,
                field="buffer_dir",
                hint="give each runtime its own --buffer-dir",
            )
        self.quarantine_dir = os.path.join(directory, QUARANTINE)
        self.quarantined = len(os.listdir(self.quarantine_dir)) if os.path.isdir(self.quarantine_dir) else 0
        seqs, last, acked = [], 0, []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".msg") and name[:-4].isdigit():
                seqs.append(int(name[:-4]))
            elif name.endswith(ACKED) and name[: -len(ACKED)].isdigit():
                acked.append(int(name[: -len(ACKED)]))
            elif name.endswith(".part") and name != SEQ_FILE + ".part":
                self._quarantine_file(name)  # a write that a crash cut short: never acknowledged
                if name[1:-5].isdigit():
                    last = max(last, int(name[1:-5]))  # its number is not reused
        seqs.sort()
        self._seqs: dict[int, None] = dict.fromkeys(seqs)
        last = max([last, *seqs[-1:], *acked])
        self._acked_marker: int | None = max(acked) if acked else None
        for seq in sorted(acked)[:-1]:  # a crash between the rename and the unlink leaves two
            self._unlink(f"{seq:012d}{ACKED}")
        try:
            with open(os.path.join(directory, SEQ_FILE)) as handle:
                last = max(last, int(handle.read().strip() or 0))
        except (OSError, ValueError):
            pass
        self._last_seq = last

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:012d}.msg")

    def __len__(self) -> int:
        return len(self._seqs)

    def close(self) -> None:
        """Give the folder up (the next runtime may take it)."""
        self._owner.release()

    def append(self, topic: str, payload: bytes) -> int:
        """Store a message durably under the next sequence number (returned); drop the oldest when full.

        OSError when it cannot be written (a full disk): its number is used up all the same (never
        handed out twice) and ``write_errors`` counts it; no ``.part`` is left behind.
        """
        with self._lock:
            self._last_seq += 1
            seq = self._last_seq
            tmp = os.path.join(self.directory, f".{seq:012d}.part")
            try:
                _write_durably(tmp, self._path(seq), topic.encode("utf-8") + b"\n" + payload)
            except OSError as exc:
                self.write_errors += 1
                reason = exc.strerror or str(exc)
                self.last_write_error = f"cannot write to the buffer folder {self.directory}: {reason}"
                for leftover in (tmp, self._path(seq)):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
                raise
            self._seqs[seq] = None
            while len(self._seqs) > self.max_messages:
                oldest = next(iter(self._seqs))
                self._remove(oldest)
                self.dropped += 1
            return seq

    def next_seq(self) -> int:
        """The number the next ``append`` will use (messages carry it as ``seq``)."""
        with self._lock:
            return self._last_seq + 1

    def remove(self, seq: int) -> None:
        """Forget a message (its PUBACK arrived)."""
        with self._lock:
            self._remove(seq)

    def _remove(self, seq: int) -> None:
        if self._seqs.pop(seq, False) is not None:
            return
        if seq != self._last_seq:
            self._unlink(os.path.basename(self._path(seq)))
            return
        # The newest message: renamed, not deleted, so that a crash before save_seq() cannot make the next
        # run reuse its number (subscribers discard a seq they already have). A rename that a power loss
        # undoes leaves the message itself: sent again under the same seq, which is harmless.
        try:
            os.replace(self._path(seq), os.path.join(self.directory, f"{seq:012d}{ACKED}"))
        except FileNotFoundError:
            return
        if self._acked_marker is not None and self._acked_marker != seq:
            self._unlink(f"{self._acked_marker:012d}{ACKED}")
        self._acked_marker = seq

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    def pending(self) -> list[int]:
        """Sequence numbers still buffered, oldest first."""
        with self._lock:
            return list(self._seqs)

    def read(self, seq: int) -> tuple[str, bytes] | None:
        """(topic, payload) of a buffered message, or None if it is gone or unreadable (then quarantined)."""
        try:
            with open(self._path(seq), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            with self._lock:
                self._seqs.pop(seq, None)
            return None
        except OSError as exc:
            self.quarantine(seq, f"unreadable: {exc}")
            return None
        problem = message_problem(data)
        if problem is not None:
            self.quarantine(seq, problem)
            return None
        topic, _, payload = data.partition(b"\n")
        return topic.decode("utf-8"), payload

    def quarantine(self, seq: int, reason: str) -> None:
        """Move a message that cannot be published out of the way (``quarantine/``) and count it."""
        with self._lock:
            if self._seqs.pop(seq, False) is None:
                self._quarantine_file(os.path.basename(self._path(seq)))
            self.last_quarantine_reason = f"{seq:012d}.msg: {reason}"

    def _quarantine_file(self, name: str) -> None:
        target, n = os.path.join(self.quarantine_dir, name), 1
        while os.path.exists(target):  # an earlier run's file of the same name stays
            n += 1
            target = os.path.join(self.quarantine_dir, f"{name}.{n}")
        try:
            os.makedirs(self.quarantine_dir, exist_ok=True)
            os.replace(os.path.join(self.directory, name), target)
        except FileNotFoundError:
            return
        except OSError as exc:  # a full disk: the file stays where it is; the next run tries again
            log.warning("cannot quarantine %s: %s", name, exc.strerror or exc)
            return
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.directory)
        self.quarantined += 1

    def save_seq(self) -> None:
        """Remember the last sequence number so numbering continues after a restart (a full disk: the
        ``.acked`` marker, if any, keeps it instead)."""
        with self._lock:
            tmp = os.path.join(self.directory, SEQ_FILE + ".part")
            try:
                _write_durably(tmp, os.path.join(self.directory, SEQ_FILE), str(self._last_seq).encode())
            except OSError as exc:
                log.warning(
                    "cannot save the last sequence number in %s: %s", self.directory, exc.strerror or exc
                )
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return
            if self._acked_marker is not None:  # the number is safe in SEQ_FILE now
                self._unlink(f"{self._acked_marker:012d}{ACKED}")
                self._acked_marker = None


def message_problem(data: bytes) -> str | None:
    """Why a buffered file is not a publishable message (None when it is): empty, no topic, bad JSON..."""
    if not data:
        return "empty file"
    topic, newline, payload = data.partition(b"\n")
    if not newline:
        return "no topic line"
    try:
        name = topic.decode("utf-8")
    except UnicodeDecodeError:
        return "the topic is not UTF-8"
    if not name or len(topic) > TOPIC_MAX_BYTES or any(c in name for c in "+#\x00"):
        return f"not a topic one can publish to: {name[:80]!r}"
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return f"the payload is not JSON (truncated?): {exc}"
    return None


def _write_durably(tmp: str, path: str, data: bytes) -> None:
    """Write ``data`` to ``tmp``, fsync it, rename it to ``path``, fsync the folder (survives power loss)."""
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # a reader never sees half a message
    fsync_dir(os.path.dirname(path) or ".")


class Publisher:
    """The MQTT side of the edge runtime: buffered QoS-1 results, a retained status with a last will,
    a subscription for requests, reconnects with backoff. One network thread; ``publish`` is thread-safe.
    """

    def __init__(
        self,
        broker: BrokerSpec,
        buffer: DiskBuffer,
        *,
        client_id: str,
        status_topic: str,
        status: Callable[[], dict],
        subscribe: tuple[str, ...] = (),
        on_message: Callable[[str, bytes], None] | None = None,
        heartbeat_s: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.broker = broker
        self.buffer = buffer
        self.client_id = client_id
        self.status_topic = status_topic
        self.status = status
        self.subscriptions = subscribe
        self.on_message = on_message
        self.heartbeat_s = heartbeat_s
        self.backoff = backoff
        self.connected = False
        self.connections = 0
        self.unbuffered = 0  # results sent without a copy on disk (the buffer could not be written)
        self.lost = 0  # results neither written nor sent (the buffer could not be written, no connection)
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._client = None
        self._ready = False
        self._inflight: dict[int, int] = {}  # paho mid -> seq
        # (mid, reason code) filled by paho's thread, no lock
        self._acked: collections.deque[tuple[int, object]] = collections.deque()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detforge-mqtt", daemon=True)

    # -- the caller's side ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background."""
        self._thread.start()

    def publish(self, topic: str, message: dict) -> int:
        """Buffer ``message`` (plus its ``seq``) on disk and send it if connected; returns the seq.

        When the buffer cannot be written (a full disk) the message is sent as it is if connected (QoS 1,
        but not kept for a reconnect) and counted in ``unbuffered``, else counted in ``lost``; either way
        ``last_error`` says why and the caller goes on.
        """
        with self._lock:
            seq = self.buffer.next_seq()
            payload = orjson.dumps({**message, "seq": seq}, option=orjson.OPT_SERIALIZE_NUMPY)
            try:
                self.buffer.append(topic, payload)
            except OSError:
                if self._ready and self._client is not None:
                    self._client.publish(topic, payload, qos=1)
                    self.unbuffered += 1
                    self._error(f"{self.buffer.last_write_error}; results are sent without a copy on disk")
                else:
                    self.lost += 1
                    self._error(f"{self.buffer.last_write_error}; results made while disconnected are lost")
                return seq
            if self._ready:
                self._send(seq)
            return seq

    def close(self, drain_timeout: float = 10.0) -> bool:
        """Wait up to ``drain_timeout`` s for every buffered message's PUBACK, say offline, disconnect,
        give the buffer folder up.

        Returns True when the buffer is empty (else what is left is published by the next run).
        """
        deadline = time.monotonic() + drain_timeout
        while len(self.buffer) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._closing.set()
        self._thread.join(timeout=max(5.0, deadline - time.monotonic() + 5.0))
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.buffer.save_seq()
        self.buffer.close()  # the folder is free for the next runtime
        return len(self.buffer) == 0

    # -- the network thread ---------------------------------------------------------------------------
    def _send(self, seq: int) -> None:
        """Hand one buffered message to paho (called with the lock held).

        A message that cannot be read back or that paho refuses is quarantined, never retried forever:
        one bad file must not stop the ones behind it.
        """
        if self._client is None:
            return
        stored = self.buffer.read(seq)
        if stored is None:
            if self.buffer.last_quarantine_reason:
                self._error(f"quarantined {self.buffer.last_quarantine_reason}")
            return
        try:
            info = self._client.publish(stored[0], stored[1], qos=1)
        except (ValueError, TypeError) as exc:  # paho refuses e.g. an oversized payload
            self.buffer.quarantine(seq, f"refused by the MQTT client: {exc}")
            self._error(f"quarantined {self.buffer.last_quarantine_reason}")
            return
        self._inflight[info.mid] = seq

    def _new_client(self):
        import paho.mqtt.client as mqtt

        api = mqtt.CallbackAPIVersion.VERSION2
        if self.broker.mqtt_version == "5":
            client = mqtt.Client(api, client_id=self.client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(api, client_id=self.client_id, protocol=mqtt.MQTTv311, clean_session=True)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            client.tls_set(
                ca_certs=self.broker.ca_file, certfile=self.broker.cert_file, keyfile=self.broker.key_file
            )
        client.will_set(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
        state = {"connack": None}

        def on_connect(client, userdata, flags, reason_code, properties):
            state["connack"] = reason_code
            if not reason_code.is_failure:
                for topic in self.subscriptions:
                    client.subscribe(topic, qos=1)

        def on_publish(client, userdata, mid, reason_code, properties):
            self._acked.append((mid, reason_code))  # no lock: paho holds its own message lock calling us

        def on_message(client, userdata, message):
            if self.on_message is not None:
                self.on_message(message.topic, message.payload)

        client.on_connect, client.on_publish, client.on_message = on_connect, on_publish, on_message
        return client, state

    def _status_payload(self, status: str) -> bytes:
        try:
            details = self.status()
        except Exception as exc:  # a status must never break the connection
            details = {"status_error": str(exc)}
        return orjson.dumps(
            {
                **details,
                "status": status,
                "client_id": self.client_id,
                "timestamp": time.time(),
                "buffered": len(self.buffer),
                "quarantined": self.buffer.quarantined,
                "buffer_write_errors": self.buffer.write_errors,
                "unbuffered": self.unbuffered,
                "lost": self.lost,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    def _process_acks(self) -> None:
        while self._acked:
            mid, reason = self._acked.popleft()
            with self._lock:
                seq = self._inflight.pop(mid, None)
            if seq is None:
                continue
            if getattr(reason, "is_failure", False):  # MQTT 5: e.g. a topic outside the broker's ACL
                self.buffer.quarantine(seq, f"the broker refused it: {reason}")
                self._error(f"quarantined {self.buffer.last_quarantine_reason}")
            else:
                self.buffer.remove(seq)

    def _error(self, message: str) -> None:
        """Remember what went wrong last and log it once (masked: no password in logs)."""
        message = mask_credentials(message)
        if message != self.last_error:
            log.warning("MQTT: %s", message)
        self.last_error = message

    def _run(self) -> None:
        pause = self.backoff[0]
        while not self._stop.is_set() and not self._closing.is_set():
            try:
                connected = self._connect_and_serve()
            except Exception as exc:  # never let the network thread die: results would pile up unsent
                self._error(f"MQTT loop failed: {type(exc).__name__}: {exc}")
                connected = False
            if connected:
                pause = self.backoff[0]
            if self._closing.wait(pause) or self._stop.is_set():
                break
            pause = min(pause * 2, self.backoff[1])

    def _connect_and_serve(self) -> bool:
        """One connection's life; True if it got connected at all."""
        import paho.mqtt.client as mqtt

        client, state = self._new_client()
        try:
            if self.broker.mqtt_version == "5":
                client.connect(
                    self.broker.host, self.broker.port, keepalive=self.broker.keepalive, clean_start=True
                )
            else:
                client.connect(self.broker.host, self.broker.port, keepalive=self.broker.keepalive)
        except (OSError, ValueError) as exc:  # refused, unreachable, a TLS certificate that does not verify
            self._error(f"cannot connect to {self.broker.host}:{self.broker.port}: {exc}")
            return False
        deadline = time.monotonic() + 10.0
        while state["connack"] is None and time.monotonic() < deadline and not self._stop.is_set():
            if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        if state["connack"] is None or state["connack"].is_failure:
            reason = state["connack"]
            hint = ""
            if reason is not None and getattr(reason, "value", 0) in (4, 5, 134, 135):
                hint = " (check --username and the password, and the broker's password file)"
            elif reason is None:
                reason = "no answer (is it an MQTT broker? TLS on a plain port or the other way round?)"
            self._error(f"broker refused the connection: {reason}{hint}")
            client.disconnect()
            return False
        with self._lock:
            self._client = client
            self._inflight.clear()
            self._acked.clear()
            for seq in self.buffer.pending():  # the backlog first, in order, before anything new
                self._send(seq)
            self._ready = True
        self.connected = True
        self.connections += 1
        client.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)
        next_beat = time.monotonic() + self.heartbeat_s
        try:
            while not self._stop.is_set():
                rc = client.loop(0.02)
                self._process_acks()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._error(f"connection lost: {mqtt.error_string(rc)}")
                    break
                if self._closing.is_set():
                    self._say_goodbye(client)
                    break
                if time.monotonic() >= next_beat:
                    client.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)
                    next_beat = time.monotonic() + self.heartbeat_s
        finally:
            with self._lock:
                self._ready = False
                self._client = None
            self.connected = False
        return True

    def _say_goodbye(self, client) -> None:
        """Publish 'offline' ourselves (a clean disconnect does not fire the will), then disconnect."""
        import paho.mqtt.client as mqtt

        info = client.publish(self.status_topic, self._status_payload("offline"), qos=1, retain=True)
        deadline = time.monotonic() + 2.0
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(0.02) != mqtt.MQTT_ERR_SUCCESS:
                break
            self._process_acks()
        client.disconnect()
        client.loop(0.05)
