"""Gather the ``results.json`` of several runs into one markdown table, with the mean and sample std over them.

    .venv/bin/python bench/collect_results.py runs/badnet-sst2-cpu-seed0 runs/badnet-sst2-cpu-seed1 ...

One row per run folder (its seed, CA / ASR of every model it reports, the teacher's CA, its wall seconds), then
a row of mean ± std (sample standard deviation) over them, and each model's mean change in clean accuracy from
its run's poisoned student, in points. A model whose every run reports the ASR's floor (runs
from 2026-12-05 on) gets CA / ASR / floor. RESULTS.md's tables are printed by this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    path = folder / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}")


def mean_std(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}" if xs else "–"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(results: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for res in results for r in res["rows"]))
    keys = {m: ("ca", "asr", "asr_floor") if all(r.get("asr_floor") is not None for res in results
                                                 for r in res["rows"] if r["model"] == m) else ("ca", "asr")
            for m in models}
    head = ["seed"] + [f"{m} CA / ASR" + (" / floor" if len(keys[m]) == 3 else "") for m in models]
    head += ["teacher CA", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        rows = {r["model"]: r for r in res["rows"]}
        cells = [str(res["seed"])]
        cells += [" / ".join(f"{rows[m][k]:.3f}" for k in keys[m]) if m in rows else "–" for m in models]
        cells += [f"{res['teacher_ca']:.3f}" if res.get("teacher_ca") is not None else "–", f"{res['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(results) > 1:
        cells = ["mean ± std"]
        for m in models:
            got = [r for res in results for r in res["rows"] if r["model"] == m]
            cells.append(" / ".join(mean_std([r[k] for r in got]) for k in keys[m]))
        cells.append(mean_std([res["teacher_ca"] for res in results if res.get("teacher_ca") is not None]))
        cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ca_change(results: list[dict]) -> str:
    """Each model's clean accuracy minus its run's poisoned student's, in points, averaged over the runs that have
    both (the "CA change" of RESULTS.md's At a glance); empty when no run has a poisoned row."""
    models = list(dict.fromkeys(r["model"] for res in results for r in res["rows"] if r["model"] != "poisoned"))
    parts = []
    for m in models:
        diffs = [100 * (rows[m]["ca"] - rows["poisoned"]["ca"]) for rows in
                 ({r["model"]: r for r in res["rows"]} for res in results) if m in rows and "poisoned" in rows]
        if diffs:
            parts.append(f"{m} {statistics.mean(diffs):+.1f}")
    return "CA change from the poisoned student, mean in points: " + ", ".join(parts) if parts else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders, each holding a results.json")
    args = p.parse_args(argv)
    results = [load(f) for f in args.runs]
    print(table(results))
    if change := ca_change(results):
        print("\n" + change)


if __name__ == "__main__":
    main(sys.argv[1:])
