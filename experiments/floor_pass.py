"""The ASR's floor read off the CA pass, against a pass of its own: the time one evaluation saves, and how far
the two floors lie apart.

    .venv/bin/python experiments/floor_pass.py --attack badnet --seed 0 --data-dir ../shared/data

The poisoned student comes from the usual stage cache (trained first if missing). ``train.evaluate`` then reads
the test sets ``--repeats`` times each way, alternating: as ``w2s.py`` does since the floor is read off the CA
pass (the floor's sentences are the test set's non-target rows; the cpu and paper presets read the whole test
set), and with a pass of their own, as before. One JSON line: the seconds of every evaluation, the two floors,
and the CA pass's count of non-target test sentences called the target (the confusion matrix), which the first
floor equals by construction where the floor's rows are all of them (BadNet, InSent; the syntactic attack leaves
out a row SCPN did not paraphrase). The second is the same sentences batched with one another rather than with the
target-label ones; in bf16 a matrix product of another shape may round a sentence across the boundary.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
import w2s  # noqa: E402


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--repeats", type=int, default=2, help="evaluations each way, alternating")
    args = parser.parse_args(argv)
    a, _, _, eval_size = w2s.resolve_configs(args)
    device = w2s.pick_device(args.device)
    task = w2s.build_task(a, eval_size, args.data_dir)
    if task.floor_in_test is None:
        raise SystemExit("error: this preset reads a subset of the test set, so the floor gets a pass of its own "
                         "either way; use --preset cpu or paper")
    folder, _ = w2s.attack_stage(a, task, Path(args.stages), device)
    model, tokenizer = w2s.load_poisoned(a, folder, task.dataset.num_classes)
    model.to(device)
    ways = {"off_ca_pass": task, "own_pass": dataclasses.replace(task, floor_in_test=None)}
    seconds, metrics = {k: [] for k in ways}, {}
    for _ in range(args.repeats):
        for way, t in ways.items():
            start = time.perf_counter()
            metrics[way] = train.evaluate(model, tokenizer, t, a.target, a.max_length, device, a.bf16)
            seconds[way].append(round(time.perf_counter() - start, 1))
    confusion = metrics["off_ca_pass"]["confusion"]
    called_target = sum(row[a.target] for y, row in enumerate(confusion) if y != a.target)
    n_asr = len(task.asr_floor)
    print(json.dumps({
        "attack": a.attack, "seed": a.seed, "preset": args.preset, "bf16": a.bf16, "device": device,
        "n_test": len(task.test), "n_floor": n_asr, "seconds": seconds,
        "floor_off_ca_pass": round(metrics["off_ca_pass"]["asr_floor"] * n_asr),
        "floor_own_pass": round(metrics["own_pass"]["asr_floor"] * n_asr),
        "confusion_called_target": called_target,
        "ca_and_asr_equal": all(metrics["off_ca_pass"][k] == metrics["own_pass"][k] for k in ("ca", "asr"))}),
        flush=True)


if __name__ == "__main__":
    main()
