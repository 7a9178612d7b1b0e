"""A/B of one exact inference change against what it replaced: our bf16 inference, the two arms alternating.

    .venv/bin/python bench/ab_inference.py --change cast_once --threads 2

The default student (SmolLM2-135M, random 2-class head, frozen weights held in bf16 as ``train.predict`` holds
them) on the same length-bucketed SST-2 batches as ``bench_vs_hf.py``. The "before" arm puts back the code the
change replaced (``BEFORE`` below); the two arms alternate in one process (``--reps`` rounds, the first one
dropped as warm-up), so a change of machine speed hits both alike, and their outputs are checked to be bit for
bit equal first. Prints tokens/s per arm (median over rounds) and their ratio, per batch size.

- ``cast_once``: ``models.cast_once`` against plain autocast (a cast at every product that reads the input).

A change that does not pay is taken out again, and its arm with it; two such (a rotary table with the sign
folded in, ``F.rms_norm``: RESULTS.md) are measured at commit 39c5460.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import common  # noqa: F401  (puts the repo root on sys.path)
import bench_vs_hf as hfbench
import models
import torch


# What each change replaced: (owner, attribute, the code before) for the "before" arm.
BEFORE = {
    "cast_once": [(models, "cast_once", lambda h: h)],
}


@contextlib.contextmanager
def patched(replacements: list):
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, fn in replacements:
        setattr(owner, name, fn)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--change", required=True, choices=list(BEFORE))
    p.add_argument("--threads", default="2", help="torch threads, or 'auto'")
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--batches", type=int, default=3, help="batches per round")
    p.add_argument("--reps", type=int, default=8, help="rounds per arm (the first is a warm-up)")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    cfg = hfbench.BenchConfig()
    gpt, tokenizer = models.load_student(cfg.student)
    clf = models.Classifier(gpt, hfbench.N_LABELS, generator=torch.Generator().manual_seed(cfg.seed)).eval()
    arms = {"after": [], "before": BEFORE[args.change]}
    print(f"{common.cpu_name()}, torch {torch.__version__}, threads {threads}, change {args.change}", flush=True)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batches = hfbench.make_batches(tokenizer, cfg, bs, args.batches)
        with contextlib.ExitStack() as hold:
            model, _ = hfbench.prepare("ours", clf, "infer_bf16", cfg, hold)
            outputs = {}
            for name, attrs in arms.items():              # the two arms give the same logits, bit for bit
                with patched(attrs), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    outputs[name] = model(batches[0].input_ids, batches[0].attention_mask)
            assert torch.equal(*outputs.values()), f"{args.change} changed the outputs"
            speed = {name: [] for name in arms}
            for rep in range(args.reps):
                for name, attrs in arms.items():
                    with patched(attrs):
                        start, tokens = time.perf_counter(), 0
                        for b in batches:
                            hfbench.step("ours", model, None, b.input_ids, b.attention_mask, b.labels, True, "cpu")
                            tokens += b.input_ids.numel()
                    if rep:                                   # round 0 is a warm-up
                        speed[name].append(tokens / (time.perf_counter() - start))
        after, before = (statistics.median(v) for v in speed.values())
        print(f"B={bs}: after {after:.0f} tok/s, before {before:.0f} tok/s, ratio {after / before:.3f}", flush=True)


if __name__ == "__main__":
    main()
