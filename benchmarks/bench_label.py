"""bench_label: how fast `detforge label` opens a large job, against sending the whole list at once.

Generates labeling input manifests (10,000 and 100,000 lines, ``s3://``-style references, two metadata
fields) under benchmarks/data/label/ and, in one subprocess per size, measures the server time to open
the job (``open_job``: read and check every line, resume from an output manifest with 10% of the images
done) and to answer the page's first requests (``/api/job``, the first page of 100 items, the first item
not done), and the bytes sent. Baseline in the same run: one answer with every item's summary, what a
page that loads the whole list (``detforge review``'s ``/api/items``) would have to fetch first.

Run: .venv/bin/python benchmarks/bench_label.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "label"
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, threading, time, urllib.request
from detforge.label import app, jobs
manifest, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
job = jobs.open_job(manifest, out=out, classes="blue box,yellow box")
opened = time.perf_counter() - t
srv = app.LabelServer(job, port=0, token="t")
threading.Thread(target=srv.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{srv.server_address[1]}"

def get(path):
    t = time.perf_counter()
    with urllib.request.urlopen(base + path + ("&" if "?" in path else "?") + "token=t") as r:
        body = r.read()
    return time.perf_counter() - t, len(body), json.loads(body)

first, sizes = 0.0, 0
for path in ("/api/job", "/api/items?offset=0&limit=100"):
    seconds, size, data = get(path)
    first, sizes = first + seconds, sizes + size
t = time.perf_counter()
whole = json.dumps([job.summary(i) for i in range(len(job.items))]).encode()
whole_s = time.perf_counter() - t
srv.shutdown()
print(json.dumps({"open_s": opened, "first_requests_s": first, "first_bytes": sizes,
                  "done": job.progress()["done"], "whole_list_s": whole_s, "whole_list_bytes": len(whole),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(total: int) -> tuple[Path, Path]:
    """An input manifest of ``total`` lines and an output manifest with every tenth image done (cached)."""
    DATA.mkdir(parents=True, exist_ok=True)
    manifest, out = DATA / f"input-{total}.manifest", DATA / f"boxes-{total}.output.manifest"
    if not manifest.exists() or not out.exists():
        with open(manifest, "w") as inp, open(out, "w") as done:
            for i in range(total):
                line = {
                    "source-ref": f"s3://bucket/frames/blue_box_{i // 1000}_{i % 1000:06d}.jpg",
                    "color": "blue",
                    "object": "box",
                }
                inp.write(json.dumps(line) + "\n")
                if i % 10 == 0:
                    name = f"boxes-{total}"
                    line[name] = {
                        "annotations": [{"class_id": 0, "width": 99, "top": 134, "height": 46, "left": 830}],
                        "image_size": [{"width": 1920, "depth": 3, "height": 1080}],
                    }
                    line[f"{name}-metadata"] = {
                        "job-name": f"labeling-job/{name}",
                        "class-map": {"0": "blue box"},
                        "human-annotated": "yes",
                        "objects": [{"confidence": 1.0}],
                        "creation-date": "2026-12-01T15:04:05.123456",
                        "type": "groundtruth/object-detection",
                    }
                    done.write(json.dumps(line) + "\n")
    return manifest, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    rows = []
    for total in (int(v) for v in args.sizes.split(",")):
        manifest, out = generate(total)
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(manifest), str(out)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        m = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "images": total,
                "done (resumed)": m["done"],
                "open s": round(m["open_s"], 3),
                "first requests s": round(m["first_requests_s"], 4),
                "first requests KB": round(m["first_bytes"] / 1024, 1),
                "whole list s (baseline)": round(m["whole_list_s"], 3),
                "whole list KB (baseline)": round(m["whole_list_bytes"] / 1024, 1),
                "peak RSS MiB": round(m["peak_rss_mib"], 1),
            }
        )
    biggest = rows[-1]
    summary = "; ".join(
        f"{r['images']:,} images: open {r['open s']} s + first page {r['first requests s']} s, "
        f"{r['first requests KB']} KB vs the whole list {r['whole list KB (baseline)']} KB"
        for r in rows
    )
    write_result(
        "label",
        title="detforge label: opening a large job",
        rows=rows,
        summary=summary,
        notes="Server time in one process (no browser); 'open' reads and checks every input line "
        "and resumes from an output manifest with every tenth image done. The page's first "
        "requests (job info, the first 100 items) stay the same size whatever the job's size; "
        f"the baseline is one JSON of every item's summary ({biggest['images']:,} images: "
        f"{biggest['whole list KB (baseline)']} KB).",
    )


if __name__ == "__main__":
    main()
