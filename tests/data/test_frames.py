"""detforge.data.frames: videos -> JPEG frames, a labeling input manifest and a contact sheet."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from detforge import storage
from detforge.data.frames import extract_frames, parse_metadata
from detforge.errors import ConfigError, FormatError

cv2 = pytest.importorskip("cv2")


def make_video(path: Path, frames: int = 30, fps: float = 10.0, size=(64, 48)) -> Path:
    """An MJPG video whose frame i is a flat grey of level 8 * i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 8 * i, np.uint8))
    writer.release()
    return path


@pytest.fixture
def video(tmp_path) -> Path:
    return make_video(tmp_path / "blue_box_1.avi")


def manifest_lines(path) -> list[dict]:
    return [orjson.loads(line) for line in storage.read_bytes(path).splitlines()]


def test_every_frame_with_metadata(video, tmp_path):
    out = tmp_path / "frames"
    calls = []
    summary = extract_frames(
        [video],
        out,
        metadata={"color": "blue", "object": "box"},
        progress=lambda v, done, total: calls.append((done, total)),
    )
    names = [f"blue_box_1_{i:06d}.jpg" for i in range(30)]
    assert summary.frames == 30 and summary.per_video == {str(video): 30} and summary.failed == {}
    assert sorted(p.name for p in out.glob("*.jpg") if p.name != "contact-sheet.jpg") == names
    assert manifest_lines(out / "input.manifest") == [
        {"source-ref": str(out / name), "color": "blue", "object": "box"} for name in names
    ]
    for i in (0, 13, 29):  # the right frame went to the right name
        with Image.open(out / names[i]) as image:
            assert image.size == (64, 48)
            assert abs(np.asarray(image, dtype=float).mean() - 8 * i) < 4
    assert calls[-1] == (30, 30)
    with Image.open(summary.contact_sheet) as sheet:
        assert sheet.format == "JPEG" and sheet.size == (6 * 244 + 4, 4 * (180 + 20) + 4)  # 24 of 30 frames


def test_every_nth_fps_and_max_frames(video, tmp_path):
    s = extract_frames([video], tmp_path / "a", every=7)
    assert [Path(x["source-ref"]).name for x in manifest_lines(s.manifest)] == [
        f"blue_box_1_{i:06d}.jpg" for i in (0, 7, 14, 21, 28)
    ]
    s = extract_frames([video], tmp_path / "b", fps=2.5)  # the video has 10 fps: every 4th frame
    assert [Path(x["source-ref"]).name for x in manifest_lines(s.manifest)] == [
        f"blue_box_1_{i:06d}.jpg" for i in range(0, 30, 4)
    ]
    s = extract_frames([video], tmp_path / "c", every=2, max_frames=3)
    assert [Path(x["source-ref"]).name for x in manifest_lines(s.manifest)] == [
        f"blue_box_1_{i:06d}.jpg" for i in (0, 2, 4)
    ]
    with Image.open(s.contact_sheet) as sheet:
        assert sheet.size == (3 * 244 + 4, 180 + 20 + 4)


def test_corrupt_video_stops_or_is_skipped(video, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    with pytest.raises(FormatError, match="broken.mp4: OpenCV cannot open this video"):
        extract_frames([bad, video], tmp_path / "a")
    summary = extract_frames([bad, video], tmp_path / "b", on_error="skip", max_frames=4)
    assert list(summary.failed) == [str(bad)] and "cannot open" in summary.failed[str(bad)]
    assert summary.per_video == {str(video): 4} and len(manifest_lines(summary.manifest)) == 4
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    summary = extract_frames([truncated], tmp_path / "d")
    assert 0 < summary.frames < 30 and summary.failed == {}
    assert summary.warnings == {
        str(truncated): f"only {summary.frames} of the 30 frames its header announces could be read"
    }
    with pytest.raises(FormatError, match="missing.avi: no such video file"):
        extract_frames([tmp_path / "missing.avi"], tmp_path / "c")


def test_bad_options(video, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        extract_frames([video], tmp_path, every=2, fps=1.0)
    with pytest.raises(ConfigError, match="every must be at least 1"):
        extract_frames([video], tmp_path, every=0)
    with pytest.raises(ConfigError, match="same name"):
        extract_frames([video, tmp_path / "x" / "blue_box_1.mp4"], tmp_path)
    with pytest.raises(ConfigError, match="on-error"):
        extract_frames([video], tmp_path, on_error="ignore")
    assert parse_metadata(["color=blue", "object=box", "note=a=b"]) == {
        "color": "blue",
        "object": "box",
        "note": "a=b",
    }
    with pytest.raises(ConfigError, match="expected key=value, got 'blue'"):
        parse_metadata(["blue"])
    with pytest.raises(ConfigError, match="source-ref"):
        parse_metadata(["source-ref=x"])


def test_to_s3(video, make_bucket):
    bucket = make_bucket()
    summary = extract_frames([video], f"s3://{bucket}/frames", every=10, metadata={"color": "blue"})
    lines = manifest_lines(f"s3://{bucket}/frames/input.manifest")
    assert lines == [
        {"source-ref": f"s3://{bucket}/frames/blue_box_1_{i:06d}.jpg", "color": "blue"} for i in (0, 10, 20)
    ]
    with Image.open(io.BytesIO(storage.read_bytes(lines[1]["source-ref"]))) as image:
        assert image.size == (64, 48)
    assert summary.contact_sheet == f"s3://{bucket}/frames/contact-sheet.jpg"
    assert storage.exists(summary.contact_sheet)


def test_cli_frames(video, tmp_path):
    import typer
    from typer.testing import CliRunner

    from detforge.cli import frames as cli_frames

    app = typer.Typer()
    cli_frames.register(app)
    app.command("noop")(lambda: None)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk")
    args = [
        "frames",
        str(video),
        str(bad),
        "--out",
        str(tmp_path / "o"),
        "--every",
        "5",
        "--meta",
        "color=blue",
        "--meta",
        "object=box",
        "--on-error",
        "skip",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # a skipped video is reported and fails the exit status
    assert "6 frames" in result.output and "skipped" in result.output
    assert manifest_lines(tmp_path / "o" / "input.manifest")[0] == {
        "source-ref": str(tmp_path / "o" / "blue_box_1_000000.jpg"),
        "color": "blue",
        "object": "box",
    }


def test_main_exit_status(video, tmp_path, capsys):
    """Through `detforge.cli.main` (what the console script runs): a skipped video gives exit status 1."""
    from detforge.cli import main

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk")
    assert main(["frames", str(video), "--out", str(tmp_path / "a"), "--max-frames", "2"]) == 0
    assert main(["frames", str(video), str(bad), "--out", str(tmp_path / "b"), "--on-error", "skip"]) == 1
    assert main(["frames", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "error: " in capsys.readouterr().err
