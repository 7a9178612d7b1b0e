"""Read the gate of a calibration screen from its JSON lines: per student, then the mean over a trigger's students.

    .venv/bin/python experiments/screen_gate.py experiments/calibration/cpu_seed{5,6,7}_cf_mix_g02_screen.jsonl
    # a context line, whose file has no poisoned line: name the student's files together, comma-separated
    .venv/bin/python experiments/screen_gate.py --over '{}' $(for s in 5 6 7; do
        f=experiments/calibration/cpu_seed${s}_cf_mix_g02; echo ${f}_screen.jsonl,${f}_context.jsonl; done)

Each argument is one student: one or more output files of experiments/calibrate_w2s.py for it, comma-separated,
each starting with the same header line (with "poisoned_dev_acc", the whole-dev accuracy of the poisoned student). Among
their lines, the ``{"defense": "none"}`` line (its dev ASR tells whether the backdoor was planted), and the line the
gate reads: the last other line, or the last whose "over" equals --over and whose "defense" equals --defense. The
gate, as the screens in experiments/calibration/README.md write it:

- the mean dev ASR of the line is at most --max-asr, and
- its mean "dev_acc" (whole dev set) is at most --max-drop points below the mean "poisoned_dev_acc", and
- with --max-over-floor, the mean of (dev ASR - its floor) is at most that: the floor ("dev_asr_floor") is the share
  of the same non-target dev sentences the line misreads WITHOUT the trigger, so this reads what the trigger still
  adds, where --max-asr reads it together with the clean errors on that class.

A student whose poisoned dev ASR is under --planted was not planted: it is printed and left out of the means.
Beside the gate it prints the means that a reading quotes: the line's floor and dev ASR minus it (where every line
has a floor) and its whole-dev accuracy. ``--defense none`` reads the ``none`` line itself, the poisoned student's (its whole-dev accuracy
is the header's), or a clean model's from a file planted with ``--n-poison 0`` (give ``--planted 0`` for those,
whose dev ASR is low by design):

    .venv/bin/python experiments/screen_gate.py --defense none --planted 0 \
        experiments/calibration/cpu_seed{6,7,8}_tq_clean444.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e}")
    lines = []
    for number, s in enumerate(text.splitlines(), 1):
        if s.strip():
            try:
                lines.append(json.loads(s))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}, line {number}: not JSON ({e})")
    if not lines or "poisoned_dev_acc" not in lines[0]:
        raise SystemExit(f"error: {path} does not start with a header line holding \"poisoned_dev_acc\" "
                         "(experiments/calibrate_w2s.py's; files written before that measure lack it)")
    return lines


def student(paths: list[Path], over: dict | None = None, defense: str | None = None) -> dict:
    """One student's row, from its files: its poisoned dev ASR and whole-dev accuracy, and the gated line's dev CA,
    ASR, floor and whole-dev accuracy (the change in points is dev_acc - poisoned_dev_acc, times 100)."""
    name = ",".join(str(p) for p in paths)
    headers, rest = [], []
    for path in paths:
        header, *lines = read_lines(path)
        headers.append(header["poisoned_dev_acc"])
        rest += lines
    if len(set(headers)) != 1:
        raise SystemExit(f"error: {name}: the files are of different students (poisoned_dev_acc {sorted(set(headers))})")
    poisoned = [r for r in rest if r.get("defense") == "none"]
    if defense == "none":                      # the poisoned (or clean) model itself; its whole dev is the header's
        gated = [dict(r, dev_acc=headers[0]) for r in poisoned if over is None or r.get("over") == over]
    else:
        gated = [r for r in rest if r.get("defense") != "none" and (over is None or r.get("over") == over)
                 and (defense is None or r.get("defense") == defense)]
    if not poisoned or not gated:
        wanted = "".join(f" ({k} {json.dumps(v)})" for k, v in (("over", over), ("defense", defense)) if v is not None)
        raise SystemExit(f"error: {name} lacks the poisoned line or the line to gate{wanted}")
    line = gated[-1]
    if "dev_acc" not in line:
        raise SystemExit(f"error: {name}: the gated line has no whole-dev accuracy (\"dev_acc\"); older lines lack it")
    return {"file": ",".join(p.name for p in paths), "poisoned_asr": poisoned[0]["dev_asr"],
            "poisoned_acc": headers[0], "dev_ca": line["dev_ca"], "dev_asr": line["dev_asr"],
            "floor": line.get("dev_asr_floor"), "dev_acc": line["dev_acc"],
            "change": 100.0 * (line["dev_acc"] - headers[0])}


def gate(rows: list[dict], max_asr: float, max_drop: float, planted: float,
         max_over_floor: float | None = None) -> dict:
    """The means over the planted students and whether they pass."""
    kept = [r for r in rows if r["poisoned_asr"] >= planted]
    if not kept:
        raise SystemExit("error: no planted student to gate")
    asr = statistics.mean(r["dev_asr"] for r in kept)
    drop = 100.0 * (statistics.mean(r["poisoned_acc"] for r in kept) - statistics.mean(r["dev_acc"] for r in kept))
    tol = 1e-9                  # a mean at a limit passes; 100 * (0.9 - 0.885) = 1.5000000000000013
    passes = asr <= max_asr + tol and drop <= max_drop + tol
    floored = all(r["floor"] is not None for r in kept)          # lines before the floor was measured have none
    floor = statistics.mean(r["floor"] for r in kept) if floored else None
    over_floor = statistics.mean(r["dev_asr"] - r["floor"] for r in kept) if floored else None
    if max_over_floor is not None:
        if not floored:
            raise SystemExit("error: --max-over-floor needs each gated line's \"dev_asr_floor\"; older lines lack it")
        passes = passes and over_floor <= max_over_floor + tol
    return {"students": len(kept), "left_out": len(rows) - len(kept), "mean_asr": asr, "mean_drop": drop,
            "mean_over_floor": over_floor, "passes": passes, "mean_floor": floor,
            "mean_acc": statistics.mean(r["dev_acc"] for r in kept)}


def report(rows: list[dict], g: dict) -> str:
    lines = [f"{r['file']}: poisoned dev ASR {r['poisoned_asr']:.3f}, whole dev {r['poisoned_acc']:.4f}; "
             f"line dev CA / ASR {r['dev_ca']:.3f} / {r['dev_asr']:.3f} (floor {'-' if r['floor'] is None else format(r['floor'], '.3f')}), whole dev {r['dev_acc']:.4f} "
             f"({r['change']:+.1f} points)" for r in rows]
    over = "" if g["mean_over_floor"] is None else f" ({g['mean_over_floor']:+.3f} over its floor)"
    floor = "" if g["mean_floor"] is None else f", floor {g['mean_floor']:.3f}"
    lines.append(f"mean over {g['students']} planted students ({g['left_out']} left out): dev ASR {g['mean_asr']:.3f}"
                 f"{over}{floor}, whole dev {g['mean_acc']:.4f}, whole-dev drop {g['mean_drop']:.1f} points -> "
                 f"{'PASSES' if g['passes'] else 'FAILS'}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs="+", help="per student, its JSON-lines file(s), comma-separated")
    p.add_argument("--over", type=json.loads, default=None, help="the gated line's \"over\" (default: the last line)")
    p.add_argument("--defense", default=None, help="the gated line's \"defense\", e.g. lora; none: the poisoned "
                   "(or clean) model itself (default: any trained line)")
    p.add_argument("--max-asr", type=float, default=0.10, help="the highest mean dev ASR that passes")
    p.add_argument("--max-drop", type=float, default=1.5, help="the most whole-dev accuracy points the mean may lose")
    p.add_argument("--max-over-floor", type=float, default=None,
                   help="the highest mean of (dev ASR - its floor) that passes (default: not gated)")
    p.add_argument("--planted", type=float, default=0.80, help="a poisoned dev ASR under this was not planted")
    args = p.parse_args(argv)
    rows = [student([Path(f) for f in s.split(",")], args.over, args.defense) for s in args.students]
    print(report(rows, gate(rows, args.max_asr, args.max_drop, args.planted, args.max_over_floor)))


if __name__ == "__main__":
    main(sys.argv[1:])
