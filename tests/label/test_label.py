"""detforge label: Ground Truth output, resume, adjustment jobs, paging, the server, the CLI, the page."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import http
from PIL import Image

from detforge.data.convert import convert
from detforge.data.groundtruth import read_manifest
from detforge.data.prepare import prepare
from detforge.data.stats import manifest_stats
from detforge.errors import ConfigError, ManifestError
from detforge.label import app, jobs, review

CLASSES = ["blue box", "yellow box"]
W, H = 200, 150
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def make_frames(folder: Path, count: int = 4) -> Path:
    """``count`` gray PNG frames with a blue and a yellow box, and an input manifest with extra fields."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        pixels = np.full((H, W, 3), 100, np.uint8)
        pixels[20 + i : 70 + i, 30:90] = (40, 70, 210)
        pixels[80:130, 120 + i : 180 + i] = (230, 200, 40)
        Image.fromarray(pixels).save(folder / f"frame_{i:03d}.png")
        lines.append(
            {"source-ref": f"frame_{i:03d}.png", "color": "blue", "object": "box", "extra": {"n": i}}
        )
    manifest = folder / "input.manifest"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the job and its output


def test_output_is_ground_truth_and_prepare_reads_it(tmp_path):
    manifest = make_frames(tmp_path / "frames")
    out = tmp_path / "jobs" / "boxes-1.output.manifest"
    job = jobs.open_job(manifest, out=out, classes="blue box, yellow box")
    assert (
        job.attribute == "boxes-1"
        and job.job_name == "boxes-1"
        and job.class_map == {0: "blue box", 1: "yellow box"}
    )
    assert not out.exists()
    job.update(1, [[30.4, 20.6, 90.2, 70.49, 0, None], [119.6, 80, 180, 130, 1, 0.8125]])
    job.update(0, [])
    job.update(3, [[200, 150, 150.2, 100.7, 1, 0.5]])  # corners in any order, clipped to the image
    found = lines_of(out)
    # the output lies in another folder: relative references are rewritten to name the same images
    assert [line["source-ref"] for line in found] == [
        "../frames/frame_000.png",
        "../frames/frame_001.png",
        "../frames/frame_003.png",
    ]
    line = found[1]
    date = line["boxes-1-metadata"].pop("creation-date")
    assert len(date) == 26 and date[10] == "T"
    assert line == {
        "source-ref": "../frames/frame_001.png",
        "color": "blue",
        "object": "box",
        "extra": {"n": 1},
        "boxes-1": {
            "annotations": [
                {"class_id": 0, "width": 60, "top": 21, "height": 49, "left": 30},
                {"class_id": 1, "width": 60, "top": 80, "height": 50, "left": 120},
            ],
            "image_size": [{"width": 200, "depth": 3, "height": 150}],
        },
        "boxes-1-metadata": {
            "job-name": "labeling-job/boxes-1",
            "class-map": {"0": "blue box", "1": "yellow box"},
            "human-annotated": "yes",
            "objects": [{"confidence": 1.0}, {"confidence": 0.8125}],
            "type": "groundtruth/object-detection",
        },
    }
    assert found[0]["boxes-1"]["annotations"] == [] and found[0]["boxes-1-metadata"]["class-map"] == {}
    assert found[2]["boxes-1"]["annotations"] == [
        {"class_id": 1, "width": 50, "top": 101, "height": 49, "left": 150}
    ]
    assert found[2]["boxes-1-metadata"]["human-annotated"] == "no"  # only an unchanged model proposal
    records = list(read_manifest(out))
    assert [r.boxes.tolist() for r in records] == [
        [],
        [[30, 21, 90, 70], [120, 80, 180, 130]],
        [[150, 101, 200, 150]],
    ]
    assert records[1].confidences.tolist() == [1.0, 0.8125] and records[1].job_name == "labeling-job/boxes-1"
    summary = prepare([str(out)], str(tmp_path / "prepared"), validation_fraction=0.0)
    assert json.loads((tmp_path / "prepared" / "classes.json").read_text()) == CLASSES
    prepared = lines_of(tmp_path / "prepared" / "train.manifest")
    assert len(prepared) == 3 and summary is not None
    # stats, convert and review read it with no special case
    figures = manifest_stats([str(out)])
    assert (figures["images"], figures["boxes"], figures["empty_images"]) == (3, 3, 1)
    assert figures["per_class"] == {"blue box": 1, "yellow box": 2}
    assert figures["per_job"] == {"labeling-job/boxes-1": 3}
    convert(str(out), to="coco", out=str(tmp_path / "coco.json"))
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert sorted(a["bbox"] for a in coco["annotations"]) == [
        [30, 21, 60, 49],
        [120, 80, 60, 50],
        [150, 101, 50, 49],
    ]
    assert [item.image_id for item in review.load_review([out], discard=tmp_path / "d.txt").items] == [
        "frame_000",
        "frame_001",
        "frame_003",
    ]


def test_bad_boxes_and_options(tmp_path):
    manifest = make_frames(tmp_path / "frames", count=2)
    out = tmp_path / "out.manifest"
    job = jobs.open_job(manifest, out=out, classes=CLASSES)
    for boxes, message in [
        ([[1, 2, 3, 4, 5, None]], "class_id 5"),
        ([[1, 2, 3]], "a box is"),
        ([[1, 2, 1.2, 40, 0, None]], "smaller than one pixel"),
        ([[1, 2, 30, 40, 0, 1.5]], "score must be"),
        ("x", "boxes must be a list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            job.update(0, boxes)
    assert not out.exists()
    with pytest.raises(ConfigError, match="name the classes"):
        jobs.open_job(manifest, out=out)
    with pytest.raises(ConfigError, match="overwrite the input"):
        jobs.open_job(manifest, out=manifest, classes=CLASSES)
    with pytest.raises(ConfigError, match="named twice"):
        jobs.open_job(manifest, out=out, classes="a,b,a")
    with pytest.raises(ConfigError, match="needs the model"):
        jobs.open_job(manifest, out=out, classes=CLASSES, order="uncertainty")
    job.update(0, [[1, 2, 30, 40, 0, None]])
    with pytest.raises(ManifestError, match=r"out.manifest:1: this line already has labels under 'out'"):
        jobs.open_job(out, out=tmp_path / "again" / "out.manifest", classes=CLASSES)
    (tmp_path / "bad.manifest").write_text('{"source-ref": "a.png"}\n{"color": "x"}\n')
    with pytest.raises(ManifestError, match=r"bad.manifest:2, field 'source-ref'"):
        jobs.open_job(tmp_path / "bad.manifest", out=out, classes=CLASSES)


def test_resume_keeps_everything(tmp_path):
    manifest = make_frames(tmp_path / "frames")
    out = tmp_path / "job.output.manifest"
    out.write_text('{"source-ref": "elsewhere.png", "kept": true}\n')  # a line of another input
    job = jobs.open_job(manifest, out=out, classes=CLASSES)
    assert job.progress() == {"done": 0, "total": 4}
    job.update(2, [[10, 10, 50, 60, 1, 0.75], [60, 10, 90, 40, 0, None]])
    job.update(1, [], done=True)
    before = out.read_bytes()
    again = jobs.open_job(manifest, out=out, classes=CLASSES)
    assert again.progress() == {"done": 2, "total": 4} and again.next_todo(0) == 0 and again.next_todo(1) == 3
    assert again.items[2].boxes == [[10.0, 10.0, 50.0, 60.0, 1, 0.75], [60.0, 10.0, 90.0, 40.0, 0, None]]
    again.save()
    assert out.read_bytes() == before  # same bytes, dates included
    assert lines_of(out)[-1] == {"source-ref": "elsewhere.png", "kept": True}
    with pytest.raises(ConfigError, match="class 'yellow box' is not one of the job's classes"):
        jobs.open_job(manifest, out=out, classes=["blue box"])


def test_adjustment_job(tmp_path):
    manifest = make_frames(tmp_path / "frames", count=3)
    first = tmp_path / "frames" / "boxes-1.output.manifest"
    job = jobs.open_job(manifest, out=first, classes=CLASSES)
    for i in range(3):
        job.update(i, [[30, 20 + i, 90, 70 + i, 0, None]])
    out = tmp_path / "frames" / "boxes-1-adjusted.output.manifest"
    adjust = jobs.open_job(first, out=out, adjust=True, classes="blue box,green box")
    assert adjust.attribute == "adjusted-boxes-1" and adjust.class_map == {0: "blue box", 1: "green box"}
    assert adjust.items[1].current == [[30.0, 21.0, 90.0, 71.0, 0, None]]
    adjust.update(0, adjust.items[0].current)  # looked at, unchanged
    adjust.update(1, [[30, 21, 95, 71, 1, None]])
    found = lines_of(out)
    assert len(found) == 2 and found[0]["boxes-1"] == lines_of(first)[0]["boxes-1"]  # the original stays
    meta = found[1]["adjusted-boxes-1-metadata"]
    assert meta["adjustment-status"] == "adjusted" and meta["human-annotated"] == "yes"
    assert meta["class-map"] == {"1": "green box"}
    assert found[0]["adjusted-boxes-1-metadata"]["adjustment-status"] == "unadjusted"
    assert found[1]["adjusted-boxes-1"]["annotations"] == [
        {"class_id": 1, "width": 65, "top": 21, "height": 50, "left": 30}
    ]
    records = list(read_manifest(out))  # the adjusted attribute wins
    assert records[1].label_attribute == "adjusted-boxes-1" and records[1].class_names == ["green box"]
    with pytest.raises(
        ManifestError,
        match=r"boxes-1.output.manifest:1.*class id 0 is 'blue box' here but "
        "'green box' in --classes",
    ):
        jobs.open_job(first, out=out, adjust=True, classes="green box")
    resumed = jobs.open_job(first, out=out, adjust=True, classes="blue box,green box")
    assert [item.done for item in resumed.items] == [True, True, False]
    assert resumed.items[1].current == [[30.0, 21.0, 95.0, 71.0, 1, None]]


# ----------------------------------------------------------------------------- the model's proposals


def test_model_proposals_and_uncertainty_order(tiny_deploy, tmp_path):
    from detforge.runtime import Predictor

    manifest = make_frames(tmp_path / "frames", count=4)
    out = tmp_path / "out.manifest"
    predictor = Predictor(tiny_deploy, threads=1)
    seen = []
    job = jobs.open_job(
        manifest,
        out=out,
        predictor=predictor,
        order="uncertainty",
        on_progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert job.class_map == {0: "blue box", 1: "yellow box"}  # the model's classes
    scores = [job.items[i].uncertainty for i in job.order]
    assert scores == sorted(scores, reverse=True) and job.order_name == "uncertainty"
    expected = predictor.predict(
        [np.asarray(Image.open(tmp_path / "frames" / "frame_002.png"))], threshold=jobs.PROPOSAL_FLOOR
    )[0]
    proposals = job.proposals(2)
    assert len(proposals) == len(expected) > 0
    assert sorted(p[5] for p in proposals) == sorted(round(s, 4) for s in expected.scores.tolist())
    assert job.items[2].uncertainty == pytest.approx(max(1 - abs(2 * p[5] - 1) for p in proposals))
    detail = job.detail(2)
    assert detail["proposals"] == proposals and (detail["w"], detail["h"]) == (W, H)
    best = proposals[0]
    job.update(2, [best])  # accepted unchanged
    line = lines_of(out)[0]
    assert line["out-metadata"]["human-annotated"] == "no"
    assert line["out-metadata"]["objects"] == [{"confidence": best[5]}]
    job.update(2, [best[:5] + [None]])  # changed: a person's box now
    assert lines_of(out)[0]["out-metadata"]["human-annotated"] == "yes"
    assert lines_of(out)[0]["out-metadata"]["objects"] == [{"confidence": 1.0}]
    with pytest.raises(ConfigError, match="none of the model's classes"):
        jobs.open_job(manifest, out=out, classes="cat,dog", predictor=predictor)

    # a restart takes the model's pass from the file beside the output instead of running it again
    calls = []

    class Counted:
        metadata, class_names = predictor.metadata, predictor.class_names

        def predict(self, images, **kwargs):
            calls.append(len(images))
            return predictor.predict(images, **kwargs)

    assert Path(str(out) + ".proposals.json").exists()
    again = jobs.open_job(manifest, out=out, predictor=Counted(), order="uncertainty")
    assert calls == [] and again.order == job.order and again.proposals(2) == proposals
    again = jobs.open_job(
        manifest, out=out, predictor=Counted(), order="uncertainty", classes="yellow box,blue box"
    )
    assert calls == [1, 1, 1, 1]  # other class ids: computed again


# ----------------------------------------------------------------------------- the server


class FixedProposals:
    """A stand-in for ``runtime.Predictor`` with known detections, so that the page test knows where to
    click (the real predictor is tested above): on frames 2 and 3 of ``make_frames``, a sure blue box, an
    unsure yellow one and a class the job does not have."""

    class_names = ["yellow box", "blue box", "unknown thing"]  # another order than the job's classes
    threshold = 0.5

    def predict(self, images, *, threshold=None):
        from detforge.runtime import Detections

        out = []
        for image in images:
            i = int(np.argmax(image[:, 30, 2] > 150)) - 20  # the frame number: its blue box's top row - 20
            rows = (
                [
                    [30, 20 + i, 90, 70 + i, 0.9, 1],
                    [120 + i, 80, 180 + i, 130, 0.3, 0],
                    [5, 5, 15, 15, 0.2, 2],
                ]
                if i in (2, 3)
                else []
            )
            array = np.array([r[:4] for r in rows], dtype=np.float64).reshape(-1, 4)
            scores = np.array([r[4] for r in rows], dtype=np.float64)
            ids = np.array([r[5] for r in rows], dtype=np.int64)
            out.append(Detections(array, scores, ids, image.shape[1], image.shape[0]))
        return out


def test_uncertainty_order_puts_unsure_images_first(tmp_path):
    manifest = make_frames(tmp_path / "frames", count=5)
    (tmp_path / "frames" / "broken.png").write_bytes(b"not an image")
    with open(manifest, "a") as handle:
        handle.write('{"source-ref": "broken.png"}\n')
    job = jobs.open_job(
        manifest,
        out=tmp_path / "out.manifest",
        classes=CLASSES,
        predictor=FixedProposals(),
        order="uncertainty",
    )
    # frames 2 and 3: a sure box (0.9) and an unsure one (0.3): uncertainty 1 - |0.6 - 1| = 0.6
    assert job.order == [2, 3, 0, 1, 4, 5]
    assert [job.items[i].uncertainty for i in job.order] == pytest.approx([0.6, 0.6, 0, 0, 0, 0])
    assert len(job.unreadable) == 1 and "broken.png" in job.unreadable[0]
    assert [s["name"] for s in job.page(0, 3)] == ["frame_002.png", "frame_003.png", "frame_000.png"]
    assert job.next_todo(0) == 0 and job.position(2) == 0


def serve(job, **kwargs):
    srv = app.LabelServer(job, port=0, token="secret-token", **kwargs)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv


def get(srv, path: str):
    status, body, _ = http(
        f"http://127.0.0.1:{srv.server_address[1]}{path}", headers={"X-Detforge-Token": "secret-token"}
    )
    assert status == 200, body
    return json.loads(body)


def test_ten_thousand_images_in_pages(tmp_path):
    manifest = tmp_path / "big.manifest"
    manifest.write_text(
        "".join(
            json.dumps({"source-ref": f"s3://bucket/frames/f_{i:05d}.jpg", "n": i}) + "\n"
            for i in range(10_000)
        )
    )
    job = jobs.open_job(manifest, out=tmp_path / "big.output.manifest", classes=CLASSES)
    srv = serve(job)
    try:
        info = get(srv, "/api/job")
        assert info["total"] == 10_000 and info["progress"] == {"done": 0, "total": 10_000}
        assert info["start"] == 0 and info["classes"] == [[0, "blue box"], [1, "yellow box"]]
        page = get(srv, "/api/items?offset=9990&limit=100")
        assert page["total"] == 10_000
        assert [item["pos"] for item in page["items"]] == list(range(9990, 10_000))
        assert page["items"][0] == {"pos": 9990, "i": 9990, "name": "f_09990.jpg", "done": False, "n": 0}
        # never the whole list
        assert len(get(srv, "/api/items?offset=0&limit=100000")["items"]) == app.MAX_PAGE
        assert get(srv, "/api/items")["items"][-1]["pos"] == 99
        job.items[0].done = job.items[1].done = True
        assert get(srv, "/api/next?from=0") == {"pos": 2}
        assert get(srv, "/api/next?from=1&step=-1") == {"pos": None}
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_guards_and_saves(tmp_path):
    manifest = make_frames(tmp_path / "frames", count=3)
    out = tmp_path / "frames" / "out.manifest"
    srv = serve(jobs.open_job(manifest, out=out, classes=CLASSES))
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert http(f"{url}/api/job")[0] == 401
        assert http(f"{url}/api/job?token=wrong")[0] == 403
        evil = {"X-Detforge-Token": "secret-token", "Host": "evil.example:80"}
        assert http(f"{url}/", headers=evil)[0] == 403
        assert http(f"{url}/api/image/3?token=secret-token")[0] == 404
        for bad in ("-1", "..%2F..%2Fetc%2Fpasswd", "frame_000.png"):  # not an index at all
            assert http(f"{url}/api/image/{bad}?token=secret-token")[0] == 400, bad
        status, body, headers = http(f"{url}/api/image/1?token=secret-token")
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body == (tmp_path / "frames" / "frame_001.png").read_bytes()
        status, body, _ = http(f"{url}/api/image/1?size=thumb&token=secret-token")
        assert status == 200 and Image.open(io.BytesIO(body)).size == (160, 120)
        assert http(f"{url}/api/image/1?size=thumb&token=secret-token")[1] == body  # from the cache
        assert get(srv, "/api/item/1") == {
            "pos": 1,
            "i": 1,
            "name": "frame_001.png",
            "done": False,
            "n": 0,
            "w": W,
            "h": H,
            "boxes": [],
            "start": [],
            "proposals": [],
            "uncertainty": 0.0,
        }
        post = f"{url}/api/item/1?token=secret-token"
        status, body, _ = http(post, data=b'{"boxes": [[10, 20, 30, 40, 1, null]]}')
        assert status == 200 and json.loads(body) == {
            "item": {"pos": 1, "i": 1, "name": "frame_001.png", "done": True, "n": 1},
            "progress": {"done": 1, "total": 3},
        }
        assert lines_of(out)[0]["out"]["annotations"] == [
            {"class_id": 1, "width": 20, "top": 20, "height": 20, "left": 10}
        ]
        status, body, _ = http(post, data=b'{"boxes": [[10, 20, 30, 40, 7, null]]}')
        assert status == 400 and "class_id 7" in json.loads(body)["error"]
        assert http(post, data=b"[1, 2]")[0] == 400 and http(post, data=b"{bad")[0] == 400
        assert http(f"{url}/api/item/1", data=b'{"boxes": []}')[0] == 401
        assert len(lines_of(out)) == 1 and lines_of(out)[0]["out"]["annotations"][0]["class_id"] == 1
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(ConfigError, match="loopback only"):
        app.LabelServer(jobs.open_job(manifest, out=out, classes=CLASSES), host="0.0.0.0", port=0)


def test_exif_turned_images_are_served_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 20 wide, 40 high, red on top
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    (tmp_path / "in.manifest").write_text('{"source-ref": "turned.jpg"}\n')
    job = jobs.open_job(tmp_path / "in.manifest", out=tmp_path / "out.manifest", classes=CLASSES)
    detail = job.detail(0)
    assert (detail["w"], detail["h"]) == (20, 40)
    data, content_type = job.image_bytes(0, thumb=False)
    shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int64)
    assert content_type == "image/jpeg" and shown.shape == (40, 20, 3)
    assert shown[5, 10, 0] > 200 and shown[35, 10, 0] < 60  # red on top
    job.update(0, [[0, 0, 20, 40, 0, None]])
    written = lines_of(tmp_path / "out.manifest")[0]["out"]["image_size"]
    assert written == [{"width": 20, "depth": 3, "height": 40}]
    with pytest.raises(ConfigError, match="smaller than one pixel"):
        job.update(0, [[25, 0, 30, 40, 0, None]])  # clipped to nothing: the image is 20 wide


# The CLI with the command modules that exist, so this test need not wait for every other command.
CLI = [
    sys.executable,
    "-c",
    "import sys, importlib.util as u, detforge.cli as c; "
    "c.COMMANDS[:] = [n for n in c.COMMANDS if u.find_spec('detforge.cli.' + n)]; sys.exit(c.main())",
]


def start_cli(args: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [*CLI, "label", *args, "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    lines = [process.stdout.readline()]
    while "open http://127.0.0.1:" not in lines[-1] and len(lines) < 10 and lines[-1]:
        lines.append(process.stdout.readline())
    assert "open http://127.0.0.1:" in lines[-1], lines
    return process, "".join(lines)


def test_cli_killed_mid_job_resumes_with_nothing_lost(tmp_path):
    manifest = make_frames(tmp_path / "frames", count=4)
    out = tmp_path / "jobs" / "boxes-1.output.manifest"
    args = [str(manifest), "--classes", "blue box,yellow box", "--out", str(out)]
    process, text = start_cli(args)
    try:
        assert text.startswith(f"4 images, 0 done; labels go to {out} as 'boxes-1'")
        url = text.split("open ")[1].split()[0]
        base, token = url.split("/?token=")
        changes = ((2, b"[[30, 20, 90, 70, 0, null]]"), (0, b"[]"), (2, b"[[31, 20, 90, 70, 1, 0.5]]"))
        for index, boxes in changes:
            status, body, _ = http(f"{base}/api/item/{index}?token={token}", data=b'{"boxes": %s}' % boxes)
            assert status == 200, body
    finally:
        process.send_signal(signal.SIGKILL)  # no chance to save anything more
        process.communicate(timeout=120)
    saved = out.read_bytes()
    process, text = start_cli(args)
    try:
        assert text.startswith("4 images, 2 done")
        base, token = text.split("open ")[1].split()[0].split("/?token=")
        status, body, _ = http(f"{base}/api/item/2?token={token}")
        assert json.loads(body)["boxes"] == [[31.0, 20.0, 90.0, 70.0, 1, 0.5]]
        status, body, _ = http(f"{base}/api/job?token={token}")
        assert json.loads(body)["start"] == 1  # the first image not done yet
        # a second labeler on the same output is refused (the killed one's lock went with it)
        second = subprocess.run(
            [*CLI, "label", *args, "--no-browser", "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )
        assert second.returncode == 2, second.stderr
        assert (
            f"{out}, field '--out': another detforge label is writing this output (pid {process.pid})"
            in second.stderr
        )
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped: 2 of 4 images done" in rest
    assert out.read_bytes() == saved and not Path(f"{out}.lock").exists()
    assert [r.image_id for r in read_manifest(out)] == ["frame_000", "frame_002"]
    bad = subprocess.run(
        [*CLI, "label", str(manifest), "--out", str(out), "--no-browser"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--classes" in bad.stderr


# ----------------------------------------------------------------------------- the page in Chromium


def drag(page, start, end) -> None:
    """Drag with the real mouse between two image points and wait until the change is saved."""
    to = "([x, y]) => window.detforgeLabel.toPage(x, y)"
    page.mouse.move(*page.evaluate(to, list(start)))
    page.mouse.down()
    page.mouse.move(*page.evaluate(to, list(end)), steps=6)
    page.mouse.up()
    page.wait_for_function("window.detforgeLabel.idle()")


def click(page, point) -> None:
    page.mouse.click(*page.evaluate("([x, y]) => window.detforgeLabel.toPage(x, y)", list(point)))
    page.wait_for_function("window.detforgeLabel.idle()")


def boxes_in(out: Path, name: str) -> list[list[int]]:
    """[class_id, left, top, width, height, confidence] of one image's line."""
    line = next(x for x in lines_of(out) if x["source-ref"] == name)
    objects = line["boxes-1-metadata"]["objects"]
    return [
        [a["class_id"], a["left"], a["top"], a["width"], a["height"], o["confidence"]]
        for a, o in zip(line["boxes-1"]["annotations"], objects, strict=True)
    ]


def near(found, expected) -> bool:
    """Same boxes, corners within 1 px (the mouse lands on whole screen pixels)."""
    return len(found) == len(expected) and all(
        f[0] == e[0] and f[5] == e[5] and all(abs(a - b) <= 1 for a, b in zip(f[1:5], e[1:5], strict=True))
        for f, e in zip(found, expected, strict=True)
    )


def test_page_in_chromium(chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright

    manifest = make_frames(tmp_path / "frames", count=6)
    (tmp_path / "frames" / "broken.png").write_bytes(b"not an image")
    with open(manifest, "a") as handle:
        handle.write('{"source-ref": "broken.png"}\n')
    out = tmp_path / "frames" / "boxes-1.output.manifest"
    job = jobs.open_job(manifest, out=out, classes=CLASSES, predictor=FixedProposals())
    srv = serve(job, threshold=0.5)
    port = srv.server_address[1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                # (the broken image's own requests answer 502: that is the message, not an error of the page)
                page.on(
                    "console",
                    lambda msg: (
                        errors.append(msg.text)
                        if msg.type == "error" and "status of 502" not in msg.text
                        else None
                    ),
                )
                requests: list[str] = []
                page.on("request", lambda req: requests.append(req.url))
                page.goto(f"http://127.0.0.1:{port}/?token=secret-token")
                page.wait_for_function("window.detforgeLabel && window.detforgeLabel.state.item")
                assert page.locator("#position").inner_text() == "#1 of 7"
                assert page.locator("#classes li").all_inner_texts() == ["1\nblue box", "2\nyellow box"]
                assert page.locator(".thumb").count() == 7

                # zoom in, then draw, resize by the corner handle, move
                fit_scale = page.evaluate("window.detforgeLabel.state.view.scale")
                page.keyboard.press("+")  # every point used below stays on the canvas at this zoom
                scale = page.evaluate("window.detforgeLabel.state.view.scale")
                assert scale == pytest.approx(fit_scale * 1.25)
                drag(page, (30, 20), (90, 70))
                assert near(boxes_in(out, "frame_000.png"), [[0, 30, 20, 60, 50, 1.0]])
                drag(page, (90, 70), (100, 80))
                assert near(boxes_in(out, "frame_000.png"), [[0, 30, 20, 70, 60, 1.0]])
                drag(page, (60, 50), (65, 55))
                assert near(boxes_in(out, "frame_000.png"), [[0, 35, 25, 70, 60, 1.0]])
                # a second box, its class by key; delete, undo, redo, undo
                drag(page, (120, 80), (180, 130))
                page.keyboard.press("2")
                page.wait_for_function("window.detforgeLabel.idle()")
                two = [[0, 35, 25, 70, 60, 1.0], [1, 120, 80, 60, 50, 1.0]]
                assert near(boxes_in(out, "frame_000.png"), two)
                assert page.locator("#classes li.current").inner_text().endswith("yellow box")
                page.keyboard.press("Delete")
                page.wait_for_function("window.detforgeLabel.idle()")
                assert near(boxes_in(out, "frame_000.png"), two[:1])
                page.keyboard.press("Control+z")
                page.wait_for_function("window.detforgeLabel.idle()")
                assert near(boxes_in(out, "frame_000.png"), two)
                page.keyboard.press("Control+Shift+z")
                page.wait_for_function("window.detforgeLabel.idle()")
                assert near(boxes_in(out, "frame_000.png"), two[:1])
                page.keyboard.press("Control+z")
                page.wait_for_function("window.detforgeLabel.idle()")
                frame0 = boxes_in(out, "frame_000.png")
                assert near(frame0, two)
                page.screenshot(path=str(tmp_path / "drawn.png"))

                # Enter: done, on to the next image not done; c copies the previous image's boxes
                page.keyboard.press("Enter")
                page.wait_for_function("document.getElementById('position').textContent === '#2 of 7'")
                page.keyboard.press("c")
                page.wait_for_function(
                    "window.detforgeLabel.state.boxes.length === 2 && window.detforgeLabel.idle()"
                )
                assert boxes_in(out, "frame_001.png") == frame0

                # proposals: the sure one shows at 0.5; a click accepts it with the model's confidence
                page.keyboard.press("ArrowRight")
                page.wait_for_function("document.getElementById('position').textContent === '#3 of 7'")
                assert page.evaluate("window.detforgeLabel.state.item.proposals") == [
                    [30, 22, 90, 72, 0, 0.9],
                    [122, 80, 182, 130, 1, 0.3],
                ]  # the unknown class is dropped
                click(page, (60, 47))
                assert boxes_in(out, "frame_002.png") == [[0, 30, 22, 60, 50, 0.9]]
                page.evaluate(
                    "() => { const s = document.getElementById('threshold'); s.value = '0.25';"
                    " s.dispatchEvent(new Event('input')); }"
                )
                assert page.locator("#threshold-text").inner_text() == "0.25"
                page.keyboard.press("a")
                page.wait_for_function("window.detforgeLabel.idle()")
                assert boxes_in(out, "frame_002.png") == [[0, 30, 22, 60, 50, 0.9], [1, 122, 80, 60, 50, 0.3]]
                click(page, (150, 105))  # select the yellow box, then widen it: a person's box now
                drag(page, (182, 105), (185, 105))
                assert near(
                    boxes_in(out, "frame_002.png"), [[0, 30, 22, 60, 50, 0.9], [1, 122, 80, 63, 50, 1.0]]
                )
                widened = boxes_in(out, "frame_002.png")[1]
                page.keyboard.press("Shift+ArrowDown")  # one pixel down, by the keyboard
                page.wait_for_function("window.detforgeLabel.idle()")
                assert boxes_in(out, "frame_002.png")[1] == [1, widened[1], 81, *widened[3:]]
                page.keyboard.press("ArrowRight")
                page.wait_for_function("document.getElementById('position').textContent === '#4 of 7'")
                page.wait_for_timeout(100)
                page.screenshot(path=str(tmp_path / "proposals.png"))
                page.keyboard.press("a")
                page.wait_for_function("window.detforgeLabel.idle()")
                assert page.locator("#progress-text").inner_text() == "done 4 / 7"
                # the wheel zooms about the mouse (the point under it stays), a right drag pans
                to = "([x, y]) => window.detforgeLabel.toPage(x, y)"
                x, y = page.evaluate(to, [100, 75])
                scale = page.evaluate("window.detforgeLabel.state.view.scale")
                page.mouse.move(x, y)
                page.mouse.wheel(0, -100)
                page.wait_for_function(f"window.detforgeLabel.state.view.scale > {scale}")
                assert page.evaluate("window.detforgeLabel.state.view.scale") == pytest.approx(scale * 1.25)
                assert page.evaluate(to, [100, 75]) == pytest.approx([x, y], abs=0.5)
                page.mouse.down(button="right")
                page.mouse.move(x + 40, y + 30, steps=3)
                page.mouse.up(button="right")
                assert page.evaluate(to, [100, 75]) == pytest.approx([x + 40, y + 30], abs=0.5)
                assert len(lines_of(out)) == 4  # neither changed a box

                # a reload opens the first image not done
                page.reload()
                page.wait_for_function("window.detforgeLabel && window.detforgeLabel.state.item")
                assert page.locator("#position").inner_text() == "#5 of 7"
                assert page.locator(".thumb.done").count() == 4
                # an image that cannot be read says so, and the keys still move on
                page.fill("#goto", "7")
                page.press("#goto", "Enter")
                page.wait_for_function("document.getElementById('position').textContent === '#7 of 7'")
                assert page.locator("#toast").inner_text().startswith("cannot open #7: ")
                assert "broken.png" in page.locator("#toast").inner_text()
                page.keyboard.press("Delete")  # nothing to edit: ignored
                page.keyboard.press("ArrowLeft")
                page.wait_for_function("document.getElementById('position').textContent === '#6 of 7'")
                assert errors == []
                assert all(u.startswith((f"http://127.0.0.1:{port}/", "data:")) for u in requests)
            finally:
                browser.close()
    finally:
        srv.shutdown()
        srv.server_close()

    found = lines_of(out)
    for line in found:
        assert line["boxes-1-metadata"].pop("creation-date")
    meta = {"job-name": "labeling-job/boxes-1", "type": "groundtruth/object-detection"}
    size = [{"width": 200, "depth": 3, "height": 150}]

    def ann(rows):
        return [{"class_id": r[0], "width": r[3], "top": r[2], "height": r[4], "left": r[1]} for r in rows]

    def line(i, rows, human, class_map):
        return {
            "source-ref": f"frame_{i:03d}.png",
            "color": "blue",
            "object": "box",
            "extra": {"n": i},
            "boxes-1": {"annotations": ann(rows), "image_size": size},
            "boxes-1-metadata": {
                "job-name": meta["job-name"],
                "class-map": class_map,
                "human-annotated": human,
                "objects": [{"confidence": r[5]} for r in rows],
                "type": meta["type"],
            },
        }

    both = {"0": "blue box", "1": "yellow box"}
    frame2 = boxes_in(out, "frame_002.png")  # its widened box checked within 1 px above
    assert found == [
        line(0, frame0, "yes", both),
        line(1, frame0, "yes", both),
        line(2, frame2, "yes", both),
        line(3, [[0, 30, 23, 60, 50, 0.9], [1, 123, 80, 60, 50, 0.3]], "no", both),
    ]
    resumed = jobs.open_job(manifest, out=out, classes=CLASSES)
    assert resumed.progress() == {"done": 4, "total": 7}
    summary = prepare([str(out)], str(tmp_path / "prepared"), validation_fraction=0.0)
    assert len(lines_of(tmp_path / "prepared" / "train.manifest")) == 4 and summary is not None
    pixels = np.asarray(Image.open(tmp_path / "proposals.png").convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank page


def test_page_accepts_and_edits_real_proposals(tiny_deploy, chromium_path, tmp_path):
    """The tiny deploy folder's detections on the page: accepted unchanged they keep the model's scores
    (human-annotated "no"); one moved by the mouse becomes a person's box (1.0, "yes")."""
    from playwright.sync_api import sync_playwright

    from detforge.runtime import Predictor

    manifest = make_frames(tmp_path / "frames", count=3)
    out = tmp_path / "frames" / "boxes-1.output.manifest"
    job = jobs.open_job(manifest, out=out, predictor=Predictor(tiny_deploy, threads=1), order="uncertainty")
    srv = serve(job, threshold=0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{srv.server_address[1]}/?token=secret-token")
                page.wait_for_function("window.detforgeLabel && window.detforgeLabel.state.item")
                item = page.evaluate("window.detforgeLabel.state.item")
                assert item["proposals"] == job.proposals(job.order[0]) and item["proposals"]
                page.keyboard.press("a")
                page.wait_for_function("window.detforgeLabel.idle()")
                accepted = page.evaluate("window.detforgeLabel.state.boxes")
                assert accepted and all(b in item["proposals"] for b in accepted)
                line = lines_of(out)[0]
                assert line["boxes-1-metadata"]["human-annotated"] == "no"
                scores = [o["confidence"] for o in line["boxes-1-metadata"]["objects"]]
                assert scores == [b[5] for b in accepted]
                # move the smallest box (its centre hits no other box first) by 3 image pixels
                k = min(
                    range(len(accepted)),
                    key=lambda j: (accepted[j][2] - accepted[j][0]) * (accepted[j][3] - accepted[j][1]),
                )
                b = accepted[k]
                centre = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
                room = 3 if b[2] + 3 <= W else -3
                drag(page, centre, (centre[0] + room, centre[1]))
                line = lines_of(out)[0]
                assert line["boxes-1-metadata"]["human-annotated"] == "yes"
                expected = [1.0 if j == k else a[5] for j, a in enumerate(accepted)]
                assert [o["confidence"] for o in line["boxes-1-metadata"]["objects"]] == expected
                moved = line["boxes-1"]["annotations"][k]
                assert abs(moved["left"] - (b[0] + room)) <= 1 and abs(moved["top"] - b[1]) <= 1
                assert errors == []
            finally:
                browser.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_with_model_and_adjust(tiny_deploy, tmp_path):
    manifest = make_frames(tmp_path / "frames", count=2)
    out = tmp_path / "jobs" / "boxes-2.output.manifest"
    process, text = start_cli(
        [
            str(manifest),
            "--model",
            str(tiny_deploy),
            "--order",
            "uncertainty",
            "--threshold",
            "0.2",
            "--out",
            str(out),
        ]
    )
    try:
        assert text.splitlines()[0] == "model: 2 of 2 images scored"
        base, token = text.split("open ")[1].split()[0].split("/?token=")
        status, body, _ = http(f"{base}/api/job?token={token}")
        info = json.loads(body)
        assert (info["order"], info["threshold"], info["model"]) == ("uncertainty", 0.2, True)
        assert info["classes"] == [[0, "blue box"], [1, "yellow box"]]
        box = b'{"boxes": [[30, 20, 90, 70, 1, null]]}'
        assert http(f"{base}/api/item/0?token={token}", data=box)[0] == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    adjusted = tmp_path / "jobs" / "boxes-2-adjusted.output.manifest"
    process, text = start_cli([str(out), "--adjust", "--out", str(adjusted)])
    try:
        assert text.startswith(f"1 images, 0 done; labels go to {adjusted} as 'adjusted-boxes-2'")
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped: 0 of 1 images done" in rest and not adjusted.exists()


def test_the_browser_is_opened_through_a_private_redirect_file(chromium_path, tmp_path):
    """`detforge label` without --no-browser starts the browser ($BROWSER, here a script that records its
    command line) with a file:// URL: no token on a command line other local users can read. The file is
    the user's alone (0600 in a 0700 folder), Chromium follows it to the page with the token, and it is
    gone when the server stops."""
    from playwright.sync_api import sync_playwright

    manifest = make_frames(tmp_path / "frames", count=2)
    argv_file = tmp_path / "browser-argv.txt"
    browser_script = tmp_path / "browser.sh"
    browser_script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > {argv_file}\n')
    browser_script.chmod(0o755)
    env = {**os.environ, "COLUMNS": "300", "BROWSER": str(browser_script)}
    out = tmp_path / "boxes-1.output.manifest"
    process = subprocess.Popen(
        [*CLI, "label", str(manifest), "--classes", "blue box", "--out", str(out), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        printed = [process.stdout.readline(), process.stdout.readline()]
        url = printed[1].split("open ")[1].split()[0]
        deadline = time.monotonic() + 30
        while not argv_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = argv_file.read_text().splitlines()
        token = url.split("?token=")[1]
        assert argv[0] == str(browser_script) and len(argv) == 2 and token not in argv[1]
        assert argv[1].startswith("file:///") and argv[1].endswith("/open.html")
        redirect = Path(argv[1][len("file://") :])
        assert stat.S_IMODE(redirect.stat().st_mode) == 0o600
        assert stat.S_IMODE(redirect.parent.stat().st_mode) == 0o700
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(argv[1])
                page.wait_for_function("window.detforgeLabel && window.detforgeLabel.state.item")
                assert page.url == url
                assert page.locator("#position").inner_text() == "#1 of 2"
            finally:
                browser.close()
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    assert not redirect.exists() and not redirect.parent.exists()
