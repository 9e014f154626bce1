"""bench_prepare: `detforge prepare` vs the blog notebook's approach on a large generated manifest.

Generates realistic Ground Truth output lines (3 jobs, 0-3 boxes, metadata) under benchmarks/data/,
then runs, each in its own subprocess, (a) ``detforge.data.prepare.prepare`` (two streaming passes, every
line checked) and (b) the notebook's way: json.loads every line into a list, discard, inject class ids,
deepcopy, shuffle, json.dumps train/validation. Reports lines/s, the ratio and each child's peak RSS,
at two sizes to show whether memory stays flat.

Run: .venv/bin/python benchmarks/bench_prepare.py [--lines 1000000] [--small 250000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "prepare"
ROOT = Path(__file__).resolve().parents[1]

NOTEBOOK = r"""
import copy, json, random, resource, sys, time
paths, out, discard = sys.argv[1].split(","), sys.argv[2], set(sys.argv[3].split(","))
t = time.perf_counter()
lines = []
for p in paths:
    with open(p) as f:
        lines += [json.loads(x) for x in f]
names = {"blue box": 0, "yellow box": 1}
kept = []
for line in lines:
    if line["source-ref"].rsplit("/", 1)[1][:-4] in discard:
        continue
    line = copy.deepcopy(line)
    cid = names[line["color"] + " " + line["object"]]
    for a in line["bb"]["annotations"]:
        a["class_id"] = cid
    line["bb-metadata"]["class-map"] = {str(cid): line["color"] + " " + line["object"]}
    kept.append(line)
random.seed(7)
random.shuffle(kept)
n = int(len(kept) * 0.1)
for name, part in (("validation", kept[:n]), ("train", kept[n:])):
    with open(f"{out}/{name}.manifest", "w") as f:
        for line in part:
            f.write(json.dumps(line) + "\n")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DETFORGE = r"""
import json, resource, sys, time
from detforge.data.prepare import prepare
paths, out, discard = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
t = time.perf_counter()
s = prepare(paths, out, discard=[discard], class_from="{color} {object}", validation_fraction=0.1, seed=7,
            overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "train": s.train, "validation": s.validation,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(total: int, folder: Path) -> tuple[list[str], list[str]]:
    """Three job manifests with ``total`` lines in all (cached), and ids to discard."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [("blue-box-large", "blue", 0.6), ("blue-box-small", "blue", 0.1), ("yellow-box", "yellow", 0.3)]
    paths = [folder / f"{name}-{total}.manifest" for name, _, _ in jobs]
    rng = random.Random(0)
    discard = []
    if not all(p.exists() for p in paths):
        for (name, color, share), path in zip(jobs, paths, strict=True):
            count = int(total * share)
            if name == "yellow-box":
                count = total - int(total * 0.6) - int(total * 0.1)
            with open(path, "w") as f:
                for i in range(count):
                    video = f"{color}_{name}_{i // 5000}"
                    anns = []
                    for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
                        w, h = rng.randint(20, 900), rng.randint(20, 700)
                        anns.append(
                            {
                                "class_id": 0,
                                "width": w,
                                "top": rng.randint(0, 1080 - h),
                                "height": h,
                                "left": rng.randint(0, 1920 - w),
                            }
                        )
                    line = {
                        "source-ref": f"s3://bucket/frames/{video}/{video}_{i % 5000:06d}.jpg",
                        "color": color,
                        "object": "box",
                        "bb": {
                            "annotations": anns,
                            "image_size": [{"width": 1920, "depth": 3, "height": 1080}],
                        },
                        "bb-metadata": {
                            "job-name": f"labeling-job/{name}",
                            "class-map": {"0": "storage box"} if anns else {},
                            "human-annotated": "yes",
                            "objects": [{"confidence": round(rng.random(), 2)} for _ in anns],
                            "creation-date": "2019-05-21T21:45:58.350877",
                            "type": "groundtruth/object-detection",
                        },
                    }
                    f.write(json.dumps(line, separators=(",", ":")) + "\n")
    for i in range(0, 200):
        discard.append(f"blue_blue-box-large_0_{i * 7:06d}")
    return [str(p) for p in paths], discard


def run(code: str, paths: list[str], out: Path, discard: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, ",".join(paths), str(out), discard],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000)
    args = parser.parse_args()
    rows = []
    for total in (args.small, args.lines):
        paths, discard = generate(total, DATA)
        discard_file = DATA / "rejected.txt"
        discard_file.write_text("\n".join(discard) + "\n")
        ours = run(DETFORGE, paths, DATA / f"out-detforge-{total}", str(discard_file))
        notebook = run(NOTEBOOK, paths, DATA / f"out-notebook-{total}", ",".join(discard))
        row = {
            "lines": total,
            "detforge_lines_per_s": round(total / ours["seconds"]),
            "notebook_lines_per_s": round(total / notebook["seconds"]),
            "speed_ratio": round(notebook["seconds"] / ours["seconds"], 2),
            "detforge_peak_rss_mib": round(ours["peak_rss_mib"], 1),
            "notebook_peak_rss_mib": round(notebook["peak_rss_mib"], 1),
        }
        print(row, flush=True)
        rows.append(row)
    big, small = rows[-1], rows[0]
    summary = (
        f"{big['lines']} lines: detforge {big['detforge_lines_per_s']} lines/s vs notebook "
        f"{big['notebook_lines_per_s']} lines/s (x{big['speed_ratio']}); peak RSS "
        f"{big['detforge_peak_rss_mib']} MiB vs {big['notebook_peak_rss_mib']} MiB; "
        f"detforge RSS at {small['lines']} lines {small['detforge_peak_rss_mib']} MiB"
    )
    write_result(
        "prepare",
        title="prepare vs notebook approach",
        rows=rows,
        summary=summary,
        notes="CPU shared by ~8 engineers during the run; each side in its own subprocess; "
        "detforge checks every line (boxes, class map) and keeps unknown fields",
    )


if __name__ == "__main__":
    main()
