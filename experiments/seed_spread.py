"""How far one student's dev reading moves with the unlearning's seed alone, from experiments/calibrate_w2s.py's JSON
lines.

    M='{"mix": 0.25, "clean_size": null, "evals_per_epoch": 2, "gamma": 0.02, "epochs": 1.0}'
    .venv/bin/python experiments/seed_spread.py --over "$M" $(for s in 6 7 8; do
        f=experiments/calibration/cpu_seed${s}_tq; echo ${f}_floor444.jsonl,${f}_mix_seeds.jsonl; done)

Each argument is one student: its files, comma-separated (experiments/screen_gate.py's convention). Its readings
are the trained lines whose "over", less any "seed" key, equals --over: the same line under different unlearning
seeds (a line without "seed" ran with the student's own). Printed per student: each reading's dev ASR, floor, whole-dev accuracy and
kept step; then, for each of the three, the pooled within-student standard deviation, the square root of the mean of
the per-student sample variances (every student needs at least two readings), and that times sqrt(2), the standard
deviation of the difference between two runs of the same line on one student.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from screen_gate import read_lines

MEASURES = ("dev_asr", "dev_asr_floor", "dev_acc")


def readings(paths: list[Path], over: dict) -> list[dict]:
    """The student's lines of ``over`` under any unlearning seed."""
    lines = [r for p in paths for r in read_lines(p)[1:]]
    return [r for r in lines if r.get("defense") != "none"
            and {k: v for k, v in r.get("over", {}).items() if k != "seed"} == over]


def pooled_sd(groups: list[list[float]]) -> float:
    """sqrt(mean over groups of each group's sample variance): the spread within a group, pooled (equal weights)."""
    if any(len(g) < 2 for g in groups):
        raise SystemExit("error: every student needs at least two readings of the line")
    return math.sqrt(statistics.mean(statistics.variance(g) for g in groups))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs="+", help="per student, its JSON-lines file(s), comma-separated")
    p.add_argument("--over", type=json.loads, required=True, help="the line's \"over\", without its seed")
    args = p.parse_args(argv)
    per_student = []
    for s in args.students:
        rows = readings([Path(f) for f in s.split(",")], args.over)
        per_student.append(rows)
        print(f"{s.split(',')[0]}: " + "; ".join(
            f"seed {r['over'].get('seed', 'own')}: {r['dev_asr']:.3f} ({r['dev_asr_floor']:.3f}), {r['dev_acc']:.4f}, "
            f"step {r['best_step']}" for r in rows))
    for m in MEASURES:
        sd = pooled_sd([[r[m] for r in rows] for rows in per_student])
        print(f"{m}: pooled within-student sd {sd:.4f}, of a paired difference {sd * math.sqrt(2):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
