"""What ``w2s.py --low-memory`` costs and saves: a few steps of the cpu preset's attack (full fine-tuning), timed,
with the process's peak resident memory, under glibc's default allocator or with the mmap threshold fixed.

    .venv/bin/python bench/low_memory_cost.py              # the default allocator
    .venv/bin/python bench/low_memory_cost.py --low-memory # stages.return_freed_memory() first

Run each in a fresh process, one at a time (two torch processes on 2 cores slow each other many times over).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import stages  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--sentences", type=int, default=192, help="training sentences: 12 steps at batch 16")
    args = ap.parse_args(argv)
    if args.low_memory:
        stages.return_freed_memory()
    a, _, _, eval_size = w2s.resolve_configs(w2s.parser().parse_args(["--attack", "badnet"]))
    model, tokenizer = w2s.student_classifier(a.student, 2, a.seed)
    task = w2s.build_task(a, eval_size)
    enc = lambda split: train.encode_for(model, tokenizer, split, a.max_length, 0, "cpu", None, a.bf16)  # noqa: E731
    data = enc(attacks.subset(task.poisoned_train, args.sentences, 0, "bench"))
    dev = enc(attacks.subset(task.dev, 8, 0, "bench"))
    cfg = dataclasses.replace(train.fit_config(a), epochs=1.0, evals_per_epoch=1)
    start = time.perf_counter()
    fit = train.fit(model, data, dev, cfg, device="cpu", desc="attack steps", progress=False)
    print(f"{'low-memory' if args.low_memory else 'default allocator'}: {fit.steps} steps in "
          f"{time.perf_counter() - start:.1f} s, process peak {stages.process_peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
