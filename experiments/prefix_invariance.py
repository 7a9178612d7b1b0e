"""Does a sentence's frozen-prefix state depend on the sentences it is batched with?

    .venv/bin/python experiments/prefix_invariance.py --threads 2            # bf16 autocast and float32

The pretrained default student's residual stream after its bottom 24 blocks (the quick preset's frozen
prefix), for 600 SST-2 training sentences as the student reads them (max 32 tokens). Computed two ways: in
length-sorted batches of 64, padded (how ``train.cache_prefix`` did it until it ran each sentence alone),
and each sentence alone. Each way is run twice: over all 600 sentences, and over a seeded 300 of them in
another order, as a rerun with a cached attack stage computes the defender's sentences. Printed: how many of
the 300 got other bits the second time, the largest difference, and the seconds for the 600. One JSON line.
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data  # noqa: E402
import registry  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402

LAYERS = 24


@torch.no_grad()
def batched(model, enc: train.Encoded, bf16: bool, batch_size: int = 64) -> list[torch.Tensor]:
    """The states of every row, computed in padded batches of ``batch_size`` (the old way)."""
    out = [None] * len(enc)
    with train.bf16_weights(model, enabled=bf16, frozen_only=False):
        for b in train.batches(enc, batch_size):
            with train.autocast("cpu", bf16):
                x = model.backbone.hidden_states(b.input_ids, b.attention_mask, layer=LAYERS - 1).float()
            for r, i in enumerate(b.index.tolist()):
                n = len(enc.ids[i])
                out[i] = x[r, -n:] if enc.padding_side == "left" else x[r, :n]
    return out


def alone(model, enc: train.Encoded, bf16: bool) -> list[torch.Tensor]:
    """The states of every row, each sentence run alone (``train.cache_prefix``)."""
    return train.cache_prefix(model, enc, LAYERS, bf16=bf16, progress=False).prefix


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="where SST-2 lives (default: the project's data folder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = w2s.student_classifier(registry.DEFAULT_STUDENT, 2, seed=0)
    model.eval()
    train_split = data.load_dataset("sst2", args.data_dir).train
    enc = train.encode(tokenizer, train_split.sentences[:600], train_split.labels[:600], 32)
    order = list(range(600))
    random.Random(0).shuffle(order)
    some = dataclasses.replace(enc, ids=[enc.ids[i] for i in order[:300]], labels=enc.labels[order[:300]])
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for bf16 in (True, False):
        for name, way in (("batched", batched), ("alone", alone)):
            start = time.perf_counter()
            full = way(model, enc, bf16)
            seconds = time.perf_counter() - start
            again = way(model, some, bf16)
            diffs = [(again[j] - full[i]).abs().max().item() for j, i in enumerate(order[:300])]
            result[f"{'bf16' if bf16 else 'fp32'}_{name}"] = {
                "differing_of_300": sum(d > 0 for d in diffs), "max_abs_diff": max(diffs),
                "seconds_600": round(seconds, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
