"""Split a defended model's ASR against a clean model's, in sentences: the RESULTS.md tables "gap above the clean
model = raised floor + trigger effect beyond the clean model's".

    .venv/bin/python experiments/floor_split.py --clean experiments/runs/amd_2026-12-06/syntactic-clean-seed2 \
        --n-asr 908 experiments/runs/amd_2026-12-06/syntactic-seed2-mix-w2s

Each run folder holds a ``results.json`` (``w2s.py``'s); the clean one is a run with nothing poisoned
(``--n-poison 0`` or ``--poison-rate 0``, its row "clean") on the same ASR sentences. Every fraction is turned back
into sentences with ``n_asr``: the row's own (results.json rows carry it since 2026-12-06), else ``--n-asr``. For
a row with ASR ``a`` and floor ``f`` (counts) beside the clean model's ``a0`` and ``f0``:

    gap = a - a0,   raised floor = f - f0,   trigger beyond the clean model's = (a - f) - (a0 - f0),

so that gap = raised floor + beyond. The last part reads "what the trigger still does to this model, beyond what
it does to a model that never saw it", under the assumption that it acts on both alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from collect_results import load


def counts(row: dict, n_asr: int | None) -> tuple[int, int, int]:
    """(ASR, floor, n) of a results.json row in sentences; refuses a fraction that is not k / n."""
    n = row.get("n_asr") or n_asr
    if n is None:
        raise SystemExit(f"error: row {row['model']!r} has no n_asr; give --n-asr")
    if row.get("asr_floor") is None:
        raise SystemExit(f"error: row {row['model']!r} has no floor (a stage cached before 2026-12-05)")
    out = []
    for key in ("asr", "asr_floor"):
        k = round(row[key] * n)
        if abs(row[key] * n - k) > 1e-3:
            raise SystemExit(f"error: row {row['model']!r}: {key} {row[key]} is not a count of {n} sentences")
        out.append(k)
    return out[0], out[1], n


def split(a: int, f: int, a0: int, f0: int) -> dict:
    """The gap above the clean model, in sentences, as raised floor + trigger effect beyond the clean model's."""
    return {"gap": a - a0, "raised_floor": f - f0, "beyond": (a - f) - (a0 - f0)}


def table(run: dict, clean: dict, n_asr: int | None = None) -> str:
    [ref] = [r for r in clean["rows"] if r["model"] == "clean"] or [None]
    if ref is None:
        raise SystemExit("error: the --clean run has no 'clean' row (run w2s.py with --n-poison 0 or --poison-rate 0)")
    a0, f0, n0 = counts(ref, n_asr)
    lines = [f"clean model: ASR {a0 / n0:.3f} ({a0}), floor {f0 / n0:.3f} ({f0}) of {n0}", "",
             "| model | ASR | floor | gap above the clean model | raised floor | trigger beyond the clean model's |",
             "|---|---|---|---|---|---|"]
    for row in run["rows"]:
        a, f, n = counts(row, n_asr)
        if n != n0:
            raise SystemExit(f"error: row {row['model']!r} counts {n} sentences, the clean model {n0}")
        s = split(a, f, a0, f0)
        cells = [f"{a / n:.3f} ({a})", f"{f / n:.3f} ({f})"] + [f"{s[k] / n:.3f} ({s[k]})" for k in s]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder holding a results.json")
    p.add_argument("--clean", type=Path, required=True, help="the clean model's run folder, on the same sentences")
    p.add_argument("--n-asr", type=int, default=None, help="sentences in the ASR set, for rows that do not say")
    args = p.parse_args(argv)
    print(table(load(args.run), load(args.clean), args.n_asr))


if __name__ == "__main__":
    main(sys.argv[1:])
