"""Where the default run's memory goes: the peak resident memory of each step of each stage, a few steps each.

    .venv/bin/python bench/memory_stages.py                 # the cpu preset's settings (the default run)
    .venv/bin/python bench/memory_stages.py --preset quick
    .venv/bin/python bench/memory_stages.py --check         # also fail when a peak is above the issue's target
    .venv/bin/python bench/memory_stages.py --low-memory    # as w2s.py --low-memory: freed memory back at once

Every step below starts a new peak (Linux: ``/proc/self/clear_refs``) and reads VmHWM after it, so each line is
what that step alone needed on top of what was resident before it ("rss after" is what it left resident). The
stages are the pipeline's own code (w2s.py, train.py, defenses.py) on small subsets (``--sentences`` training
sentences, ``--steps`` optimizer steps): a step's memory depends on the batch, not on how many batches follow.

``--check`` is the memory regression check: it exits 1 when the largest peak is above ``--target-mb`` (by default
the targets: 2,500 MB for the cpu preset, 1,500 MB for quick). It is a benchmark, not a test: it needs the
open weights and about a minute.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_mb, rss_mb  # noqa: E402

import torch  # noqa: E402

import attacks  # noqa: E402
import data  # noqa: E402
import defenses  # noqa: E402
import stages  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402
import weights  # noqa: E402

TARGET_MB = {"cpu": 2500, "quick": 1500}


class Probe:
    """Prints and keeps one line per step: its peak and what it left resident."""

    def __init__(self):
        self.rows = []
        self.t = time.perf_counter()

    def start(self):
        gc.collect()
        stages.reset_peak()
        self.t = time.perf_counter()

    def mark(self, stage: str, step: str):
        peak, now = peak_rss_mb(), rss_mb()
        row = {"stage": stage, "step": step, "peak_mb": round(peak), "rss_after_mb": round(now),
               "seconds": round(time.perf_counter() - self.t, 1)}
        self.rows.append(row)
        print(f"{stage:10s} {step:42s} peak {peak:7.0f} MB   rss after {now:7.0f} MB   {row['seconds']:6.1f} s",
              flush=True)
        self.start()


def longest(split, k: int):
    """The ``k`` longest sentences of ``split``: trained on, every batch is at (nearly) the preset's max length, so a
    step shows its largest peak (activations grow with the length)."""
    rows = sorted(zip(split.sentences, split.labels), key=lambda r: -len(r[0]))[:k]
    return data.Split([s for s, _ in rows], [y for _, y in rows])


def trim():
    """Give freed heap memory back to the OS (glibc); what it frees is fragmentation, not live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def fit_steps(p: Probe, stage: str, model, train_data, dev_data, cfg, loss_fn, device, steps: int):
    """``train.fit``'s loop, cut into its steps, each measured: the first forward, backward, clipping and
    optimizer step (where AdamW makes its state), then more steps, the dev evaluation and the snapshot."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = train.make_optimizer(params, cfg.lr, cfg.weight_decay, device)
    p.mark(stage, "optimizer created")
    model.train()
    batches = train.batches(train_data, cfg.batch_size, shuffle=True, rng=random.Random(0))
    with train.bf16_weights(model, enabled=cfg.bf16):
        p.mark(stage, "frozen weights cast to bf16")
        for i in range(steps):
            batch = next(batches).to(device)
            with train.autocast(device, cfg.bf16):
                loss, _ = loss_fn(model, batch)
            if i < 2:
                p.mark(stage, f"step {i + 1}: forward")
            loss.backward()
            if i < 2:
                p.mark(stage, f"step {i + 1}: backward")
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)          # as train.fit does: gradients freed after the step
            if i < 2:
                p.mark(stage, f"step {i + 1}: clip + optimizer step")
        p.mark(stage, f"steps 3..{steps}")
        train.predict(model, dev_data, device=device, bf16=cfg.bf16)
        p.mark(stage, f"dev evaluation ({len(dev_data)} sentences)")
        trained = {n: q.detach() for n, q in model.named_parameters() if q.requires_grad}
        weights.write_safetensors(ROOT / "runs" / "memory-probe" / ".best-checkpoint.tmp", trained)
        p.mark(stage, "best checkpoint to a file (train.fit)")
        best = {n: q.to("cpu", copy=True) for n, q in trained.items()}
        p.mark(stage, "best checkpoint in memory (fit's default)")
    del optimizer, best, trained, params
    gc.collect()
    p.mark(stage, "optimizer and snapshot freed")
    trim()
    p.mark(stage, "malloc_trim")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", choices=["cpu", "quick"])
    ap.add_argument("--sentences", type=int, default=64, help="training sentences per stage")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    ap.add_argument("--low-memory", action="store_true",
                    help="fix glibc's mmap threshold, as w2s.py --low-memory does (stages.return_freed_memory)")
    ap.add_argument("--only", default=None, choices=["attack"], help="stop after this stage")
    ap.add_argument("--whole-fit", action="store_true", help="also run train.fit itself on the subset (attack)")
    ap.add_argument("--check", action="store_true", help="exit 1 when the largest peak is above --target-mb")
    ap.add_argument("--target-mb", type=float, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    if args.low_memory:
        stages.return_freed_memory()                       # as w2s.py --low-memory does
    run_args = w2s.parser().parse_args(["--attack", "badnet", "--preset", args.preset])
    a, t, u, eval_size = w2s.resolve_configs(run_args)
    device = train.pick_device("cpu")
    n = max(args.sentences, args.steps * max(a.batch_size, t.batch_size, u.batch_size))   # a batch for every step
    p = Probe()
    print(f"preset {args.preset}, bf16 {a.bf16}, {n} sentences, {args.steps} steps; rss at start {rss_mb():.0f} MB")
    p.start()
    task = w2s.build_task(a, eval_size)
    p.mark("data", "build_task (dataset, poisoning)")

    # ---- attack: the student, fully fine-tuned (cpu) or its top blocks (quick)
    model, tokenizer = w2s.student_classifier(a.student, task.dataset.num_classes, a.seed, a.start_token,
                                              a.prefix_space)
    p.mark("attack", "load student (GGUF, dequantized)")
    frozen = train.frozen_blocks(model, a.train_layers)
    if a.freeze_embeddings or frozen:
        model.backbone.tok_emb.weight.requires_grad_(False)
    for block in model.backbone.blocks[:frozen]:
        block.requires_grad_(False)
    memo_key = ("pretrained", a.student)
    sub = lambda split, k: attacks.subset(split, k, 0, "probe")      # noqa: E731
    train_data = train.encode_for(model, tokenizer, longest(task.poisoned_train, n), a.max_length, frozen, device,
                                  memo_key, a.bf16)
    dev_data = train.encode_for(model, tokenizer, sub(task.dev, 64), a.max_length, frozen, device, memo_key, a.bf16)
    p.mark("attack", "encode (+ frozen prefix)")
    fit_steps(p, "attack", model, train_data, dev_data, train.fit_config(a), train.cross_entropy_loss, device,
              args.steps)
    if args.whole_fit:
        cfg = dataclasses.replace(train.fit_config(a), epochs=args.steps * a.batch_size / n)
        train.fit(model, train_data, dev_data, cfg, device=device, progress=False,
                  best_file=ROOT / "runs" / "memory-probe" / ".best-checkpoint.tmp")
        p.mark("attack", "train.fit itself")
    small = dataclasses.replace(task, test=sub(task.test, 64), asr_test=sub(task.asr_test, 64),
                                asr_floor=sub(task.asr_floor, 64), floor_in_test=None)
    train.evaluate(model, tokenizer, small, a.target, a.max_length, device, a.bf16, frozen, memo_key)
    p.mark("attack", "evaluate (3 x 64 sentences)")
    folder = ROOT / "runs" / "memory-probe"
    folder.mkdir(parents=True, exist_ok=True)
    stages.save_model(model, folder / "student.safetensors")
    p.mark("attack", "save_model")
    del model, train_data, dev_data
    gc.collect()
    trim()
    p.mark("attack", "student freed + malloc_trim")
    if args.only == "attack":
        return report(p, args)

    # ---- teacher: MiniLM, fully fine-tuned
    tmodel, ttok = w2s.teacher_classifier(t, task.dataset.num_classes, 576)
    p.mark("teacher", "load teacher")
    clean = longest(task.dataset.train, n)
    tdata = train.encode(ttok, clean.sentences, clean.labels, t.max_length)
    tdev = train.encode(ttok, task.dev.sentences[:64], task.dev.labels[:64], t.max_length)
    fit_steps(p, "teacher", tmodel, tdata, tdev, train.fit_config(t), train.cross_entropy_loss, device, args.steps)
    del tmodel
    gc.collect()

    # ---- a LoRA defense: the poisoned student with LoRA on q and v (W2SDefense's loss without the teacher terms)
    model, tokenizer = w2s.load_poisoned(a, folder, task.dataset.num_classes)
    p.mark("defense", "load poisoned student (+ safetensors)")
    frozen = defenses.add_lora(model, u)
    p.mark("defense", f"add LoRA (rank {u.rank})")
    clean = longest(task.dataset.train, n)
    ldata = train.encode_for(model, tokenizer, clean, u.max_length, frozen, device, ("probe", "poisoned"), u.bf16)
    ldev = train.encode_for(model, tokenizer, sub(task.dev, 64), u.max_length, frozen, device, ("probe", "poisoned"),
                            u.bf16)
    p.mark("defense", "encode (+ frozen prefix)")
    loss_fn = defenses.unlearning_loss(u.alpha, 0.0, 0.0, u.T)
    fit_steps(p, "defense", model, ldata, ldev, train.fit_config(u, warmup_ratio=0.0), loss_fn, device, args.steps)

    return report(p, args)


def report(p: Probe, args) -> int:
    top = max(p.rows, key=lambda r: r["peak_mb"])
    print(f"\nlargest peak: {top['peak_mb']} MB ({top['stage']}: {top['step']}); "
          f"process peak {stages.process_peak_mb():.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": p.rows}, indent=1) + "\n")
    target = args.target_mb or TARGET_MB[args.preset]
    if args.check and top["peak_mb"] > target:
        print(f"memory regression: {top['peak_mb']} MB > {target:.0f} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
