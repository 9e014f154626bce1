"""Tiled inference wired into the runtime: ``Predictor`` (model.json's tiling, the options over it), and the
same detections for one photo from ``detforge predict``, ``serve`` and ``edge`` (real server, real broker),
``evaluate --tile`` and a bad ``tiling`` in model.json."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image

from detforge import tiling
from detforge.errors import ModelError

pytest.importorskip("onnxruntime")

TILED = {"tile": 64, "overlap": 0.25, "full_pass": True}


def tiled_copy(deploy: Path, folder: Path, setting) -> Path:
    """A copy of the tiny deploy folder whose model.json carries ``setting`` as its tiling."""
    shutil.copytree(deploy, folder)
    metadata = json.loads((folder / "model.json").read_text())
    metadata["tiling"] = setting
    (folder / "model.json").write_text(json.dumps(metadata))
    return folder


def big_photo(path: Path) -> Path:
    """A 200 x 130 photo of the tiny model's boxes (blue class 0, yellow class 1), one across a tile edge."""
    pixels = np.full((130, 200, 3), 110, np.uint8)
    pixels[10:34, 20:44] = (40, 70, 210)
    pixels[60:90, 40:75] = (230, 200, 40)  # across x = 45 / 64, the windows' edges
    pixels[90:120, 150:190] = (40, 70, 210)
    Image.fromarray(pixels).save(path)
    return path


def test_predictor_runs_model_json_tiling_and_matches_its_windows_one_by_one(tiny_deploy, tmp_path):
    from detforge.runtime import Predictor

    deploy = tiled_copy(tiny_deploy, tmp_path / "deploy", TILED)
    photo = np.asarray(Image.open(big_photo(tmp_path / "photo.png")))
    predictor = Predictor(deploy, threads=1)
    assert predictor.tiling == tiling.Tiling(64, 0.25, True)
    found = predictor.predict([photo], threshold=0.05)[0]
    assert (found.width, found.height) == (200, 130)
    # the same windows through the whole-image path one at a time, mapped and merged here
    whole = Predictor(deploy, threads=1, tile=0)
    assert whole.tiling is None
    windows = tiling.passes(200, 130, predictor.tiling)
    assert windows.tolist()[:4] == [[0, 0, 64, 64], [45, 0, 109, 64], [91, 0, 155, 64], [136, 0, 200, 64]]
    assert len(windows) == 4 * 3 + 1
    boxes, scores, ids, cut = [], [], [], []
    for x0, y0, x1, y1 in windows.tolist():
        d = whole.predict([np.ascontiguousarray(photo[y0:y1, x0:x1])], threshold=0.05)[0]
        boxes.append(d.boxes_xyxy + [x0, y0, x0, y0])
        scores.append(d.scores)
        ids.append(d.class_ids)
        cut.append(tiling.cut_by_inner_edge(boxes[-1], [x0, y0, x1, y1], width=200, height=130))
    expected = tiling.merge(
        np.concatenate(boxes), np.concatenate(scores), np.concatenate(ids), np.concatenate(cut), touch=1.0
    )
    assert len(found) == len(expected[0]) > 0
    np.testing.assert_allclose(found.boxes_xyxy, expected[0], atol=1e-3)
    np.testing.assert_allclose(found.scores, expected[1], atol=1e-5)
    assert found.class_ids.tolist() == expected[2].tolist()
    # the options over model.json's
    assert Predictor(deploy, threads=1, overlap=0.5, full_pass=False).tiling == tiling.Tiling(64, 0.5, False)


def test_bad_tiling_in_model_json_names_the_file_and_field(tiny_deploy, tmp_path):
    from detforge.runtime import Predictor

    deploy = tiled_copy(tiny_deploy, tmp_path / "deploy", {"tile": 64, "overlap": 2})
    with pytest.raises(ModelError, match=r"model.json, field 'tiling.overlap': the overlap is a fraction"):
        Predictor(deploy)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "detforge", *args], capture_output=True, text=True, timeout=300
    )


def serve_answer(deploy: Path, photo: Path) -> list:
    import httpx

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "serve",
            str(deploy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        response = httpx.post(
            f"{url}/invocations",
            content=photo.read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["prediction"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def edge_answer(deploy: Path, photo: Path, broker, tmp_path: Path) -> list:
    import paho.mqtt.client as mqtt

    messages: list[dict] = []
    arrived = threading.Condition()
    subscribed = threading.Event()

    def on_message(client, userdata, message):
        with arrived:
            messages.append((message.topic, json.loads(message.payload)))
            arrived.notify_all()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = lambda *a, **k: subscribed.set()
    client.connect("127.0.0.1", broker.port)
    client.subscribe("detforge/infer/#", qos=1)
    client.loop_start()
    subscribed.wait(10)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "edge",
            str(deploy),
            "--broker",
            broker.url,
            "--buffer-dir",
            str(tmp_path / "buffer"),
            "--threads",
            "1",
            "--allow-path",
            str(photo.parent),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def wait(condition) -> dict:
            with arrived:
                assert arrived.wait_for(lambda: any(condition(t, m) for t, m in messages), 60), messages
                return next(m for t, m in messages if condition(t, m))

        wait(lambda t, m: t.endswith("status") and m.get("status") == "online")
        client.publish("detforge/infer/input", json.dumps({"filepath": str(photo)}), qos=1)
        answer = wait(lambda t, m: t.endswith("output"))
        return answer["prediction"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        client.loop_stop()
        client.disconnect()


def test_predict_serve_and_edge_give_one_photo_the_same_tiled_detections(tiny_deploy, mqtt_broker, tmp_path):
    from detforge.runtime import Predictor

    deploy = tiled_copy(tiny_deploy, tmp_path / "deploy", TILED)
    (tmp_path / "photos").mkdir()
    photo = big_photo(tmp_path / "photos" / "photo.png")
    done = run_cli("predict", str(deploy), str(photo), "--out", str(tmp_path / "p.jsonl"), "--threads", "1")
    assert done.returncode == 0, done.stderr
    from_predict = json.loads((tmp_path / "p.jsonl").read_text())["prediction"]
    expected = Predictor(deploy, threads=1).predict([str(photo)])[0].to_sagemaker()
    whole = Predictor(deploy, threads=1, tile=0).predict([str(photo)])[0].to_sagemaker()
    assert from_predict == json.loads(json.dumps(expected)) and expected != whole
    assert serve_answer(deploy, photo) == from_predict
    assert edge_answer(deploy, photo, mqtt_broker, tmp_path) == from_predict
    # --tile 0 turns the deploy folder's tiling off
    done = run_cli("predict", str(deploy), str(photo), "--out", str(tmp_path / "w.jsonl"), "--tile", "0")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "w.jsonl").read_text())["prediction"] == json.loads(json.dumps(whole))


def test_evaluate_takes_the_tiling_options_and_refuses_them_for_a_run(tiny_deploy, tiny_run, tmp_path):
    validation = tiny_run.parent / "validation" / "data.manifest"
    done = run_cli(
        "evaluate", str(tiny_deploy), str(validation), "--tile", "32", "--overlap", "0.5", "--no-coco"
    )
    assert done.returncode == 0, done.stderr
    done = run_cli("evaluate", str(tiny_run), str(validation), "--tile", "32")
    assert done.returncode == 2
    assert "field 'tile': tiled inference (--tile, --overlap, --tile-full-pass) runs a deploy" in done.stderr
    done = run_cli(
        "predict", str(tiny_deploy), str(validation), "--out", str(tmp_path / "x.jsonl"), "--overlap", "0.3"
    )
    assert done.returncode == 2
    assert "field '--overlap': --overlap needs --tile SIZE" in done.stderr


def test_serve_batches_count_a_tiled_photo_as_its_tiles(tiny_deploy, tmp_path):
    import asyncio

    from detforge.deploy.serve import Batcher, Metrics, _Job
    from detforge.runtime import Predictor

    deploy = tiled_copy(tiny_deploy, tmp_path / "deploy", TILED)
    photo = np.zeros((130, 200, 3), np.uint8)  # 4 x 3 tiles and the full pass: 13 model inputs
    small = np.zeros((64, 64, 3), np.uint8)  # one tile: 1

    async def batch_sizes(predictor, images) -> list[int]:
        batcher = Batcher(predictor, max_batch=8, max_wait_ms=0, threshold=None, metrics=Metrics())
        for image in images:
            batcher._queue.put_nowait(_Job(image, None))
        sizes = []
        while not batcher._queue.empty():
            sizes.append(len(await batcher._collect()))
        return sizes

    tiled = Predictor(deploy, threads=1)
    assert tiled.work(photo) == 13 and tiled.work(small) == 1
    assert asyncio.run(batch_sizes(tiled, [photo, photo, small])) == [1, 1, 1]
    assert asyncio.run(batch_sizes(tiled, [small] * 10)) == [8, 2]
    whole = Predictor(deploy, threads=1, tile=0)
    assert asyncio.run(batch_sizes(whole, [photo, photo, small])) == [3]


def test_label_proposals_come_from_tiled_inference(tiny_deploy, tmp_path):
    import os

    from conftest import http

    from detforge.data.groundtruth import make_record, write_manifest
    from detforge.label.jobs import PROPOSAL_FLOOR
    from detforge.runtime import Predictor

    (tmp_path / "photos").mkdir()
    photo = big_photo(tmp_path / "photos" / "photo.png")
    manifest = tmp_path / "photos" / "input.manifest"
    write_manifest(
        manifest,
        [
            make_record(
                "photo.png",
                width=200,
                height=130,
                boxes_xyxy=np.zeros((0, 4)),
                class_ids=[],
                class_map={},
                creation_date="2024-01-01T00:00:00",
            )
        ],
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "label",
            str(manifest),
            "--model",
            str(tiny_deploy),
            "--tile",
            "64",
            "--overlap",
            "0.25",
            "--order",
            "uncertainty",
            "--out",
            str(tmp_path / "out.manifest"),
            "--port",
            "0",
            "--no-browser",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    try:
        lines = [process.stdout.readline()]
        while "open http://127.0.0.1:" not in lines[-1] and len(lines) < 10 and lines[-1]:
            lines.append(process.stdout.readline())
        assert "open http://127.0.0.1:" in lines[-1], lines
        base, token = lines[-1].split("open ")[1].split()[0].split("/?token=")
        status, body, _ = http(f"{base}/api/item/0?token={token}")
        assert status == 200, body
        proposals = json.loads(body)["proposals"]
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    tiled = Predictor(tiny_deploy, threads=1, tile=64, overlap=0.25).predict(
        [str(photo)], threshold=PROPOSAL_FLOOR
    )[0]
    whole = Predictor(tiny_deploy, threads=1).predict([str(photo)], threshold=PROPOSAL_FLOOR)[0]
    assert len(proposals) == len(tiled)
    assert sorted(p[5] for p in proposals) == sorted(round(s, 4) for s in tiled.scores.tolist())
    assert sorted(tiled.scores.tolist()) != sorted(whole.scores.tolist())  # the options were used
