"""detforge review: discard file, flags, model disagreement, the guarded server, the page in Chromium."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import http
from PIL import Image

from detforge import storage
from detforge.data.groundtruth import make_record, write_manifest
from detforge.errors import ConfigError, FormatError
from detforge.label import review

CLASS_MAP = {0: "red box", 1: "blue box"}
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

# (image name, job, boxes xyxy, class ids) on 160x120 images
IMAGES = [
    ("a_000", "job-a", [[10, 10, 60, 50]], [0]),
    ("a_001", "job-a", [], []),
    ("a_002", "job-a", [[0, 20, 40, 70], [100, 30, 102, 90]], [0, 1]),  # at the edge; tiny (2 px wide)
    ("b_000", "job-b", [[30, 30, 90, 90]], [1]),
    ("b_001", "job-b", [[20, 20, 80, 80], [90, 10, 150, 60], [5, 70, 50, 110]], [1, 1, 0]),
    ("b_002", "job-b", [[50, 40, 110, 100]], [0]),
]


def make_images(folder: Path, prefix: str = "") -> list[Path]:
    """Two job manifests over six small noisy JPEGs; returns the manifest paths."""
    rng = np.random.default_rng(0)
    records = {"job-a": [], "job-b": []}
    for name, job, boxes, ids in IMAGES:
        path = folder / f"{name}.jpg"
        Image.fromarray((rng.random((120, 160, 3)) * 255).astype(np.uint8)).save(path, quality=90)
        records[job].append(
            make_record(
                prefix + str(path),
                width=160,
                height=120,
                boxes_xyxy=boxes,
                class_ids=ids,
                class_map=CLASS_MAP,
                job_name=f"labeling-job/{job}",
            )
        )
    paths = []
    for job, recs in records.items():
        paths.append(folder / f"{job}.manifest")
        write_manifest(paths[-1], recs)
    return paths


@pytest.fixture
def manifests(tmp_path) -> list[Path]:
    return make_images(tmp_path)


@pytest.fixture
def server(manifests, tmp_path):
    """A review server on a free loopback port, in a thread of this process."""
    session = review.load_review(manifests, discard=tmp_path / "rejected.txt")
    srv = review.ReviewServer(session, port=0, token="secret-token")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def base(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


# ----------------------------------------------------------------------------- files and flags


def test_discard_file_round_trip(tmp_path):
    text = review.format_discard({"b_001": "loose\tbox\n here", "a_000": ""}, total=6)
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# ") and "2 rejected of 6 images" in lines[1]
    assert lines[2:] == ["a_000", "b_001\tloose box here"]
    path = tmp_path / "d.txt"
    path.write_text(text + "\n# a note\n  \nc_9\t wrong class \n")
    assert review.read_discard(path) == {"a_000": "", "b_001": "loose box here", "c_9": "wrong class"}
    assert review.read_discard(tmp_path / "absent.txt") == {}


def test_load_flags_jobs_and_empty(manifests, tmp_path):
    session = review.load_review(manifests, discard=tmp_path / "r.txt")
    by_id = {item.image_id: item for item in session.items}
    assert [item.image_id for item in session.items] == [name for name, *_ in IMAGES]
    assert by_id["a_002"].edge == 1 and by_id["a_002"].tiny == 1
    assert by_id["b_001"].edge == 0 and by_id["b_001"].tiny == 0
    assert by_id["a_001"].boxes == [] and by_id["a_000"].job == "labeling-job/job-a"
    assert by_id["b_001"].classes == ["blue box", "blue box", "red box"]
    assert session.progress() == {"reviewed": 0, "rejected": 0, "kept": 0, "total": 6}
    with pytest.raises(ConfigError, match="at least one manifest"):
        review.load_review([], discard=tmp_path / "r.txt")


def test_compare_with_predictions_exact():
    item = review.ReviewItem(
        index=0,
        image_id="x",
        source_ref="x.jpg",
        job="j",
        width=400,
        height=400,
        boxes=[[0, 0, 100, 100], [200, 200, 300, 300], [0, 300, 50, 350]],
        classes=["a", "a", "b"],
    )
    rows = [
        [0, 0.95, 0, 0, 0.25, 0.25],  # label 0 exactly: fine
        [0, 0.8, 0.5, 0.5, 0.625, 0.75],  # label 1 at IoU 0.5: low IoU
        [1, 0.9, 0.75, 0.75, 1.0, 1.0],  # nothing labeled there: a missed object
        [0, 0.2, 0.0, 0.75, 0.125, 0.875],
    ]  # below the score threshold: ignored, so label 2 is extra
    review.compare_with_predictions(item, rows, class_names=["a", "b"], score_threshold=0.5)
    assert (item.missed, item.extra, item.low_iou) == (1, 1, 1)
    assert item.suspicion == pytest.approx(0.9 + 1 + 0.5)
    assert item.predictions[1] == ["a", 0.8, 200.0, 200.0, 250.0, 300.0]
    # class-aware: a prediction of the wrong class on label 0 does not match it
    review.compare_with_predictions(
        item, [[1, 0.9, 0, 0, 0.25, 0.25]], class_names=["a", "b"], score_threshold=0.5
    )
    assert (item.missed, item.extra, item.low_iou) == (1, 3, 0)
    review.compare_with_predictions(item, [[1, 0.9, 0, 0, 0.25, 0.25]], class_names=None, score_threshold=0.5)
    assert (item.missed, item.extra, item.low_iou) == (0, 2, 0)
    assert item.predictions[0][0] == "class 1"


def test_predictions_file(manifests, tmp_path):
    preds = tmp_path / "predictions.jsonl"
    lines = [
        {"image": "a_000.jpg", "prediction": [[0, 0.9, 10 / 160, 10 / 120, 60 / 160, 50 / 120]]},
        {"image": "s3://bucket/frames/b_001.jpg", "prediction": []},
    ]
    preds.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    session = review.load_review(manifests, discard=tmp_path / "r.txt", predictions=preds)
    by_id = {item.image_id: item for item in session.items}
    assert (by_id["a_000"].missed, by_id["a_000"].extra, by_id["a_000"].low_iou) == (0, 0, 0)
    assert by_id["b_001"].extra == 3 and by_id["b_001"].suspicion == 3
    assert by_id["b_000"].extra == 1  # no line for it: every label is unconfirmed
    assert max(session.items, key=lambda i: i.suspicion).image_id == "b_001"
    # the one predictions parser (evaluate's): the same message, line and field
    for row, message in (
        ("[0, 0.9, 0.1]", r"'prediction\[0\]': expected \[class_id, score, xmin"),
        ("[0, NaN, 0, 0, 0.1, 0.1]", r"'prediction\[0\].score': score is nan"),
        ("[true, 0.9, 0, 0, 0.1, 0.1]", r"'prediction\[0\]': expected"),
        ("[-1, 0.9, 0, 0, 0.1, 0.1]", r"'prediction\[0\].class_id': unknown class id -1"),
    ):
        preds.write_text('{"image": "a.jpg", "prediction": [' + row + "]}\n")
        with pytest.raises(FormatError, match=r"predictions.jsonl:1, field " + message):
            review.load_review(manifests, discard=tmp_path / "r.txt", predictions=preds)


def test_decisions_are_saved_and_survive_a_restart(manifests, tmp_path):
    discard = tmp_path / "out" / "rejected.txt"
    discard.parent.mkdir()
    discard.write_text("# from an earlier review of other jobs\nother_9\tfoo\n")
    session = review.load_review(manifests, discard=discard)
    progress = session.decide("a_002", "reject", "box\toff")
    assert progress == {"reviewed": 1, "rejected": 1, "kept": 0, "total": 6}
    session.decide("b_000", "keep")
    session.decide("b_001", "reject")
    session.decide("b_001", "clear")
    session.decide("a_000", "reject")
    lines = [ln for ln in discard.read_text().splitlines() if not ln.startswith("#")]
    assert lines == ["a_000", "a_002\tbox off", "other_9\tfoo"]  # ids of other manifests are kept
    sidecar = json.loads(Path(review.sidecar_path(discard)).read_text())
    assert sidecar["kept"] == ["b_000"] and sidecar["rejected"] == ["a_000", "a_002", "other_9"]
    with pytest.raises(ConfigError, match="not in the loaded manifests"):
        session.decide("zzz", "reject")
    with pytest.raises(ConfigError, match="unknown decision"):
        session.decide("a_000", "maybe")
    again = review.load_review(manifests, discard=discard)
    assert again.rejected == {"a_000": "", "a_002": "box off", "other_9": "foo"} and again.kept == {"b_000"}
    assert again.progress() == {"reviewed": 3, "rejected": 2, "kept": 1, "total": 6}


# ----------------------------------------------------------------------------- the server


def test_server_token_and_allowed_images(server):
    url = base(server)
    assert http(f"{url}/api/items")[0] == 401
    assert http(f"{url}/api/image/0")[0] == 401
    assert http(f"{url}/api/items?token=wrong")[0] == 403
    assert http(f"{url}/", headers={"X-Detforge-Token": "secret-token", "Host": "evil.example:80"})[0] == 403
    status, body, _ = http(f"{url}/api/items", headers={"X-Detforge-Token": "secret-token"})
    assert status == 200 and len(json.loads(body)["items"]) == 6
    assert http(f"{url}/api/image/6?token=secret-token")[0] == 404
    for bad in ("-1", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "a_000.jpg"):  # not an index at all
        assert http(f"{url}/api/image/{bad}?token=secret-token")[0] == 400, bad
    assert http(f"{url}/../../etc/passwd?token=secret-token")[0] == 404
    status, body, headers = http(f"{url}/api/image/1?token=secret-token")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (160, 120)
    status, body, _ = http(f"{url}/api/image/1?size=thumb&token=secret-token")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (160, 120)  # never upscaled
    decide = f"{url}/api/decide?token=secret-token"
    status, body, _ = http(
        decide,
        data=b'{"id": "b_002", "decision": "reject", "reason": "bad image"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200 and json.loads(body)["progress"]["rejected"] == 1
    assert http(f"{url}/api/decide", data=b'{"id": "b_002", "decision": "keep"}')[0] == 401
    assert http(decide, data=b'{"id": "nope", "decision": "reject"}')[0] == 400
    status, body, headers = http(f"{url}/api/discard?token=secret-token")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert body.decode().splitlines()[-1] == "b_002\tbad image"


def test_thumbnail_is_downscaled():
    buffer = io.BytesIO()
    Image.new("RGB", (1200, 600), (200, 30, 30)).save(buffer, "PNG")
    thumb = Image.open(io.BytesIO(review.make_thumbnail(buffer.getvalue())))
    assert thumb.format == "JPEG" and thumb.size == (256, 128)


def test_server_refuses_other_hosts(manifests, tmp_path):
    session = review.load_review(manifests, discard=tmp_path / "r.txt")
    with pytest.raises(ConfigError, match="loopback only"):
        review.ReviewServer(session, host="0.0.0.0", port=0)


def test_s3_images_and_discard(make_bucket, tmp_path):
    bucket = make_bucket()
    local = tmp_path / "local"
    local.mkdir()
    manifests = make_images(local)
    for path in local.glob("*.jpg"):
        storage.write_bytes(f"s3://{bucket}/frames/{path.name}", path.read_bytes())
    text = manifests[0].read_text().replace(str(local) + "/", f"s3://{bucket}/frames/")
    storage.write_text(f"s3://{bucket}/job-a.manifest", text)
    session = review.load_review([f"s3://{bucket}/job-a.manifest"], discard=f"s3://{bucket}/rejected.txt")
    assert session.items[0].source_ref == f"s3://{bucket}/frames/a_000.jpg"
    data, content_type = session.image_bytes(0, thumb=True)
    assert content_type == "image/jpeg" and Image.open(io.BytesIO(data)).size == (160, 120)
    session.decide("a_001", "reject", "blurry")
    assert storage.read_text(f"s3://{bucket}/rejected.txt").splitlines()[-1] == "a_001\tblurry"
    assert review.load_review(
        [f"s3://{bucket}/job-a.manifest"], discard=f"s3://{bucket}/rejected.txt"
    ).rejected == {"a_001": "blurry"}


# The CLI with the command modules that exist, so this test need not wait for every other command.
CLI = [
    sys.executable,
    "-c",
    "import sys, importlib.util as u, detforge.cli as c; "
    "c.COMMANDS[:] = [n for n in c.COMMANDS if u.find_spec('detforge.cli.' + n)]; sys.exit(c.main())",
]


def test_cli_serves_until_interrupted(manifests, tmp_path):
    discard = tmp_path / "rejected.txt"
    env = {**os.environ, "COLUMNS": "300"}
    process = subprocess.Popen(
        [*CLI, "review", *map(str, manifests), "--discard", str(discard), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[0].startswith("6 images, 0 reviewed, 0 rejected"), lines
        url = lines[1].split()[1]
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        status, body, _ = http(url)
        assert status == 200 and b"detforge review" in body
        assert http(url.split("?")[0])[0] == 401
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped: 0 of 6 reviewed" in out
    bad = subprocess.run(
        [*CLI, "review", str(tmp_path / "none.manifest"), "--discard", str(discard), "--no-browser"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "none.manifest" in bad.stderr and "no such file" in bad.stderr


# ----------------------------------------------------------------------------- the page in Chromium


def test_page_in_chromium(server, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright

    url = server.server_address
    page_url = f"http://127.0.0.1:{url[1]}/?token=secret-token"
    discard = Path(server.session.discard)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_url)
            page.wait_for_selector(".tile[data-id='b_002']")
            assert page.locator(".tile").count() == 6
            assert page.locator("#progress-text").inner_text() == "reviewed 0 / 6 · rejected 0"
            # grid: → twice puts the cursor on the third image; g opens it
            page.keyboard.press("ArrowRight")
            page.keyboard.press("j")
            assert page.locator(".tile.cursor").get_attribute("data-id") == "a_002"
            page.keyboard.press("g")
            assert page.locator("#current-id").inner_text() == "a_002"
            assert page.locator("#overlay rect").count() == 2
            page.keyboard.press("k")
            assert page.locator("#current-id").inner_text() == "a_001"
            page.keyboard.press("ArrowRight")
            # reject a_002 with a reason typed in the box (e, type, Enter), then b_000 with r
            page.keyboard.press("e")
            page.keyboard.type("box off the object")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('current-id').textContent === 'b_000'")
            page.keyboard.press("r")
            page.wait_for_function("document.getElementById('current-id').textContent === 'b_001'")
            page.keyboard.press("a")
            page.wait_for_function(
                "document.getElementById('progress-text').textContent.startsWith('reviewed 3')"
            )
            assert page.locator("#progress-text").inner_text() == "reviewed 3 / 6 · rejected 2"
            assert review.read_discard(discard) == {"a_002": "box off the object", "b_000": ""}
            # zoom doubles the drawn image
            width = page.locator("#photo").bounding_box()["width"]
            page.keyboard.press("z")
            assert page.locator("#photo").bounding_box()["width"] == pytest.approx(2 * width, rel=0.01)
            page.keyboard.press("?")
            assert page.locator("#help").is_visible()
            page.keyboard.press("Escape")
            assert not page.locator("#help").is_visible()

            # a reload (and the server restarted from the files) still shows them rejected
            page.reload()
            page.wait_for_selector(".tile[data-id='b_002']")
            assert page.locator(".tile.reject").evaluate_all("els => els.map(e => e.dataset.id)") == [
                "a_002",
                "b_000",
            ]
            assert page.locator(".tile.keep").get_attribute("data-id") == "b_001"
            restarted = review.load_review(manifests_of(server), discard=discard)
            assert restarted.rejected == {"a_002": "box off the object", "b_000": ""}

            # filters: job, empty images, tiny boxes, decision
            page.select_option("#f-job", "labeling-job/job-b")
            assert page.locator(".tile").count() == 3
            page.select_option("#f-job", "")
            page.select_option("#f-empty", "empty")
            assert page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id)") == ["a_001"]
            page.select_option("#f-empty", "")
            page.check("#f-tiny")
            assert page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id)") == ["a_002"]
            page.uncheck("#f-tiny")
            page.select_option("#f-status", "unreviewed")
            assert page.locator(".tile").count() == 3
            page.select_option("#f-status", "")
            page.fill("#f-min", "2")
            page.locator("#f-min").dispatch_event("change")
            assert tile_ids(page) == ["a_002", "b_001"]

            page.wait_for_function("[...document.querySelectorAll('.tile img')].every(i => i.complete)")
            shot = tmp_path / "review.png"
            page.screenshot(path=str(shot))
            page.keyboard.press("g")
            page.wait_for_function("document.getElementById('photo').complete")
            page.screenshot(path=str(tmp_path / "single.png"))
            assert errors == []
            assert all(u.startswith(f"http://127.0.0.1:{url[1]}/") or u.startswith("data:") for u in requests)
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank page


def tile_ids(page) -> list[str]:
    return page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id)")


def manifests_of(srv) -> list[str]:
    """The manifests the server's items came from (their folder holds job-a/job-b.manifest)."""
    folder = Path(srv.session.items[0].source_ref).parent
    return [str(folder / "job-a.manifest"), str(folder / "job-b.manifest")]


def test_a_second_session_on_one_discard_file_is_refused(manifests, tmp_path):
    """Two `detforge review` on one discard file: the second is refused naming the first's pid (before, the
    last writer won and the other's rejections were lost); the first goes on saving, and once it stops the
    file is free again."""
    discard = tmp_path / "rejected.txt"
    args = [*CLI, "review", *map(str, manifests), "--discard", str(discard), "--port", "0", "--no-browser"]
    env = {**os.environ, "COLUMNS": "300"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [first.stdout.readline(), first.stdout.readline()]
        url = lines[1].split()[1]
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
        status, _, _ = http(url.replace("/?", "/api/decide?"), data=b'{"id": "a_001", "decision": "reject"}')
        assert status == 200
    finally:
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.strip() == (
        f"error: {discard}, field '--discard': another detforge review is "
        f"writing this discard list (pid {first.pid}) (stop it first, or give "
        "another --discard)"
    )
    assert first.returncode == 0 and "stopped: 1 of 6 reviewed, 1 rejected" in out
    assert storage.read_text(discard).splitlines()[-1] == "a_001" and not Path(f"{discard}.lock").exists()
    with review.discard_lock(discard):  # free again
        with pytest.raises(ConfigError, match=rf"another detforge review .* \(pid {os.getpid()}\)"):
            with review.discard_lock(discard):
                pass


def test_deeply_nested_predictions_are_a_one_line_error(manifests, tmp_path):
    """A JSON line nested 100,000 deep: orjson refuses it at 1,024 levels, and the NaN-tolerant second
    reader must not overflow the stack (it raised RecursionError): the error names file and line."""
    predictions = tmp_path / "predictions.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    predictions.write_text('{"image": "a_000.jpg", "prediction": []}\n' + deep + "\n")
    with pytest.raises(FormatError) as info:
        review.load_review(manifests, discard=tmp_path / "d.txt", predictions=predictions)
    assert str(info.value) == (
        f"{predictions}:2: not valid JSON: depth limit exceeded: line 1 column 1026 (char 1025)"
    )
    done = subprocess.run(
        [
            *CLI,
            "review",
            *map(str, manifests),
            "--discard",
            str(tmp_path / "d.txt"),
            "--predictions",
            str(predictions),
            "--no-browser",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {info.value}"]
    done = subprocess.run(
        [*CLI, "evaluate", str(predictions), str(manifests[0]), "--out", str(tmp_path / "metrics")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {info.value}"]
