"""What every benchmark shares: machine description, peak memory, writing one result file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine a figure was measured on (benchmarks compare ratios within one run)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "python": platform.python_version(), "system": platform.platform()}


def peak_rss_mib_of_children() -> float:
    """Peak resident memory of finished child processes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def write_result(name: str, *, title: str, rows: list[dict], summary: str, notes: str = "") -> Path:
    """Save one benchmark's figures as benchmarks/results/<name>.json."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"name": name, "title": title, "machine": machine(),
               "date": dt.datetime.now().isoformat(timespec="seconds"), "rows": rows,
               "summary": summary, "notes": notes}
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"{title}: {summary}")
    return path
