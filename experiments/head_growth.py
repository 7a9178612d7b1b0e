"""How much the classification head's discriminative direction grows during unlearning.

    .venv/bin/python experiments/head_growth.py runs/badnet-sst2-cpu-seed0-defense-w2s-origin ...

For each run folder, the stages behind its rows are found in the stage cache by their metrics (CA, ASR and
seconds, which together identify a stage), and the head of each unlearned model (saved with its LoRA) is compared
with the poisoned student's: the ratio of the norms of the row difference ``w_0 - w_1`` (two classes), i.e. how
much larger every margin the head reads becomes for the same feature. One line per run folder. With ``--logs``,
also one line per unlearning stage from its per-step log (``history.json``): its seconds, FA at the first step,
the means of FA and CE over the last 25 steps, and, where beta > 0, the share ``beta*KL / (alpha*CE)`` of the
weighted KL term in the weighted cross-entropy (median and maximum over the steps).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import weights  # noqa: E402
from calibrate_w2s import last_terms  # noqa: E402


def stage_of(stages: Path, prefix: str, row: dict) -> Path:
    """The one stage folder ``<prefix>-*`` whose metrics.json has the row's CA, ASR and seconds."""
    found = [d for d in stages.glob(f"{prefix}-*") if (d / "metrics.json").is_file()
             and all(json.loads((d / "metrics.json").read_text())[k] == row[k] for k in ("ca", "asr", "seconds"))]
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} stages {prefix}-* match the row {row['model']} (want exactly one)")
    return found[0]


def margin_direction(state: dict) -> float:
    w = next(v for k, v in state.items() if k.startswith("head") and k.endswith("weight")).float()
    if w.shape[0] != 2:
        raise SystemExit(f"error: a head with {w.shape[0]} classes; this measure is for two")
    return (w[0] - w[1]).norm().item()


def log_summary(history: list[dict], weights_: dict, last: int = 25) -> dict:
    """FA at the first step, mean FA and CE over the ``last`` steps, and the weighted KL's share of the weighted
    CE per step (median, max). A term the run did not log (the control logs CE only) is None."""
    means = last_terms(history, last)
    out = {"fa_first": history[0].get("fa"), "fa_last": means.get("fa"), "ce_last": means["ce"],
           "kl_share_median": None, "kl_share_max": None}
    if weights_["beta"]:
        share = sorted(weights_["beta"] * h["kd"] / (weights_["alpha"] * h["ce"]) for h in history)
        out.update(kl_share_median=share[len(share) // 2], kl_share_max=share[-1])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders, each holding a results.json")
    p.add_argument("--stages", type=Path, default=Path("runs/stages"), help="the stage cache the runs used")
    p.add_argument("--logs", action="store_true", help="also summarise each unlearning stage's per-step log")
    args = p.parse_args(argv)
    for run in args.runs:
        rows = json.loads((run / "results.json").read_text())["rows"]
        poisoned = stage_of(args.stages, "attack", rows[0])
        before = margin_direction(weights.read_safetensors(poisoned / "student.safetensors"))
        cells, logs = [], []
        for r in rows[1:]:
            stage = stage_of(args.stages, r["model"], r)
            after = margin_direction(weights.read_safetensors(stage / "lora.safetensors"))
            cells.append(f"{r['model']} x{after / before:.2f}")
            if args.logs:
                summary = log_summary(json.loads((stage / "history.json").read_text()), r["weights"])
                logs.append(f"  {r['model']}: {r['seconds']:.0f} s, " + ", ".join(
                    f"{k} {v:.4g}" for k, v in summary.items() if v is not None))
        print(run.name, " ".join(cells))
        for line in logs:
            print(line)


if __name__ == "__main__":
    main()
