"""Gather the ``results.json`` of several runs into one markdown table, with the mean and sample std over them.

    .venv/bin/python experiments/collect_results.py runs/badnet-sst2-cpu-seed0 runs/badnet-sst2-cpu-seed1 ...

One row per run folder (its seed, CA / ASR of every model it reports, the teacher's CA, its wall seconds), then
a row of mean ± std (sample standard deviation) over them, and each model's mean change in clean accuracy from
its run's poisoned student, in points. A model whose every run reports the ASR's floor (runs
from 2026-12-05 on) gets CA / ASR / floor. RESULTS.md's tables are printed by this script.

Runs of one poisoned student under several unlearning seeds (``w2s.py --unlearn-seed``; the seed column reads
``0 u100``) are also read per student: each model's ASR and CA change averaged over the student's runs, then over
the students, with the standard error over students, and the pooled within-student standard deviation of the ASR
(the spread that the unlearning seed alone makes; `seed_spread.pooled_sd`); last, each student's mean ASR.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from seed_spread import pooled_sd


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


def seed_cell(res: dict) -> str:
    """The attack's seed, and the unlearning's where it differs (``0 u100``)."""
    u = res.get("unlearn_seed", res["seed"])
    return str(res["seed"]) if u == res["seed"] else f"{res['seed']} u{u}"


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
        cells = [seed_cell(res)]
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


def by_student(results: list[dict]) -> list[list[dict]]:
    """The runs grouped by poisoned student (the same attack configuration, seed included), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for res in results:
        groups.setdefault(json.dumps(res["config"]["attack"], sort_keys=True), []).append(res)
    return list(groups.values())


def per_student(results: list[dict]) -> str:
    """Where a student has runs under several unlearning seeds: each model's ASR and CA change (points, from the
    poisoned student) averaged over each student's runs, then over the students, ± the standard error over
    students (sample sd of the per-student means / sqrt(students)); and the pooled within-student sd of the ASR,
    sqrt(mean of the per-student sample variances), over the students with two runs or more. Empty otherwise."""
    students = by_student(results)
    if all(len(runs) < 2 for runs in students):
        return ""
    lines = [f"Per poisoned student ({len(students)}; runs per student: {', '.join(str(len(r)) for r in students)}), "
             "mean over its unlearning seeds, then over students, ± standard error over students:"]
    models = list(dict.fromkeys(r["model"] for res in results for r in res["rows"] if r["model"] != "poisoned"))
    tables = [[{r["model"]: r for r in res["rows"]} for res in runs] for runs in students]
    means = []
    for m in models:
        if any(m not in rows or "poisoned" not in rows for student in tables for rows in student):
            raise SystemExit(f"error: reading per student needs a poisoned and a {m} row in every run")
        asr = [[rows[m]["asr"] for rows in student] for student in tables]
        change = [[100 * (rows[m]["ca"] - rows["poisoned"]["ca"]) for rows in student] for student in tables]
        pooled = [a for a in asr if len(a) >= 2]
        lines.append(f"- {m}: ASR {se_of_means(asr)}, CA change {se_of_means(change, '+.1f')} points; "
                     f"within-student sd of ASR {pooled_sd(pooled):.4f} "
                     f"({len(pooled)} students with two runs or more)")
        means.append(f"{m} " + ", ".join(f"{statistics.mean(a):.3f}" for a in asr))
    return "\n".join(lines + ["Each student's mean ASR over its unlearning seeds: " + "; ".join(means)])


def se_of_means(groups: list[list[float]], fmt: str = ".3f") -> str:
    means = [statistics.mean(g) for g in groups]
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    return f"{statistics.mean(means):{fmt}} ± {se:{fmt.lstrip('+')}}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders, each holding a results.json")
    args = p.parse_args(argv)
    results = [load(f) for f in args.runs]
    print(table(results))
    if change := ca_change(results):
        print("\n" + change)
    if students := per_student(results):
        print("\n" + students)


if __name__ == "__main__":
    main(sys.argv[1:])
