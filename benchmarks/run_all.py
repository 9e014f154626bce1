"""Run every benchmarks/bench_*.py (or those named), then render results.json and RESULTS.md.

python benchmarks/run_all.py            # all
python benchmarks/run_all.py prepare    # only bench_prepare.py, others keep their last figures
python benchmarks/run_all.py --render   # only re-render from benchmarks/results/*.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# what `make bench` passes to a benchmark whose full run takes hours (run that alone: see its docstring)
QUICK_ARGS = {"bench_realdata.py": ["--quick"]}


def render() -> None:
    results = [json.loads(p.read_text()) for p in sorted((HERE / "results").glob("*.json"))]
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Benchmark results",
        "",
        "Made by `make bench` (`benchmarks/run_all.py`). Each benchmark compares against its named",
        "baseline *in the same run* on the machine named with it; the machine is shared and noisy,",
        "so read the ratios, not the absolute times.",
        "",
    ]
    for result in results:
        m = result["machine"]
        lines += [
            f"## {result['title']}",
            "",
            f"{result['summary']}",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; "
            f"measured {result['date']}.",
            "",
        ]
        rows = result["rows"]
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in rows:
                lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")
            lines.append("")
        if result.get("notes"):
            lines += [result["notes"], ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")
    render_readme(results)


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def render_readme(results: list[dict]) -> None:
    """The README's benchmark table (between its bench markers): one row per benchmark, its summary."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    rows = ["| benchmark | headline (baseline in the same run) | measured |", "|---|---|---|"]
    for result in results:
        if result["name"].endswith("_quick"):  # a check that the benchmark runs, not a figure
            continue
        line = str(result.get("headline") or result["summary"]).replace("|", "/").replace("\n", " ")
        anchor = _anchor(result["title"])
        rows.append(
            f"| [{result['title']}](benchmarks/RESULTS.md#{anchor}) | {line} | {str(result['date'])[:10]} |"
        )
    machines = sorted({r["machine"]["cpu"] + f", {r['machine']['cores']} cores" for r in results})
    rows += [
        "",
        f"Machine: {'; '.join(machines)} (shared and noisy: read the ratios). Details, rows and "
        "notes: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).",
    ]
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + README_START + "\n" + "\n".join(rows) + "\n" + README_END + tail)
    print(f"updated the benchmark table in {readme}")


def _anchor(title: str) -> str:
    """GitHub's anchor of a RESULTS.md heading: lower case, punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title.strip().lower()))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str]) -> int:
    if "--render" not in argv:
        names = [a for a in argv if not a.startswith("-")]
        scripts = sorted(HERE.glob("bench_*.py"))
        if names:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
        failed = []
        for script in scripts:
            print(f"== {script.name}", flush=True)
            if (
                subprocess.run(
                    [sys.executable, str(script), *QUICK_ARGS.get(script.name, [])], cwd=HERE.parent
                ).returncode
                != 0
            ):
                failed.append(script.name)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
