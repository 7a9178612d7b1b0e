"""Where a step's time goes: its matrix products against everything else, and what that allows.

    .venv/bin/python bench/matmul_ceiling.py --threads 2      # writes RESULTS_ceiling.md, results_ceiling.json

Issue 7 asks for ratios of whole steps (ours / transformers + peft) and for an MFU, model FLOPs / time / matmul
peak, with the peak measured on one large (2048, 2048) product. This script splits a step of ours into its
matrix products and the rest, on the same batches as ``bench_vs_hf.py`` (real SST-2 sentences, the median
padded length of an epoch), and times each kind three ways:

* **ours, whole step**, and **the reference's whole step**, alternating, median of ``--steps``;
* **ours, products in the step**: one step run under a dispatch mode that times every product op
  (mm, bmm, linear, matmul, ...) as it runs, in place, with everything around it (cold caches, the layouts
  our code gives it);
* **the same products alone**: each product of a block at the step's shapes and dtype, run back to back
  with warm caches (the most favourable case), summed over the blocks.

Then, if everything outside the products took no time at all, ours could not be faster than
``reference step / products in our step``, and its MFU could not exceed
``model FLOPs / products time / peak`` (with the in-step or the warm-cache product time). Those are the
ceilings of any rewrite of the code around the products in eager PyTorch; fusing the products themselves
(a compiler, custom kernels) is outside them.

Products of a block (``F.linear`` layout for weights, ``x @ Wᵀ``): forward q, k, v, o, gate, up, down and
attention's two batched products; in a LoRA step also each weight's input gradient (``grad @ W``; not for block
0's q, k, v, whose input, the frozen embedding, needs none) and attention's four backward products. The LoRA
matrices' own products (r = 8), which the MFU's FLOP count leaves out, are not in the warm-cache sum, which only
raises that ceiling; they are in the in-step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import bench_vs_hf as hb
import models
import torch
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode

MODES = ("lora_fp32", "lora_bf16", "infer_bf16")
PRODUCT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
               torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.baddbmm.default}


# ----------------------------------------------------------------------------------------------
# Products alone, warm caches
# ----------------------------------------------------------------------------------------------

def block_products(cfg: models.GPTConfig, B: int, T: int) -> dict:
    """One block's products: phase -> name -> (lhs shape, rhs shape)."""
    M, d, hd = B * T, cfg.d_model, cfg.head_dim
    q_out, kv_out, g = cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_head // cfg.n_kv_head
    linears = {"q": (d, q_out), "k": (d, kv_out), "v": (d, kv_out), "o": (q_out, d),
               "gate": (d, cfg.d_ff), "up": (d, cfg.d_ff), "down": (cfg.d_ff, d)}    # (in, out)
    bh = B * cfg.n_kv_head                                     # attention batches (query heads stacked)
    fwd = {name: ((M, i), (i, o)) for name, (i, o) in linears.items()}               # x @ Wᵀ
    fwd["q kᵀ"] = ((bh, g * T, hd), (bh, hd, T))
    fwd["p v"] = ((bh, g * T, T), (bh, T, hd))
    bwd = {f"d{name}": ((M, o), (o, i)) for name, (i, o) in linears.items()}         # grad @ W
    bwd["ds k"] = ((bh, g * T, T), (bh, T, hd))
    bwd["dsᵀ q"] = ((bh, T, g * T), (bh, g * T, hd))
    bwd["dy vᵀ"] = ((bh, g * T, hd), (bh, hd, T))
    bwd["pᵀ dy"] = ((bh, T, g * T), (bh, g * T, hd))
    return {"fwd": fwd, "bwd": bwd}


def time_alone(a, b, reps: int) -> float:
    """Median seconds of ``a @ b`` over ``reps`` runs after two warm-ups."""
    cpu = torch.device("cpu")
    for _ in range(2):
        common.time_matmul(a, b, cpu)
    return statistics.median(common.time_matmul(a, b, cpu) for _ in range(reps))


def products_alone(cfg: models.GPTConfig, B: int, T: int, dtype, kind: str, reps: int) -> float:
    """Seconds of the products one step of ``kind`` ("infer" or "lora") runs, each timed alone, summed
    over the blocks."""
    gen = torch.Generator().manual_seed(0)
    seconds = {}
    for phase, products in block_products(cfg, B, T).items():
        for name, (ls, rs) in products.items():
            a = torch.randn(ls, generator=gen).to(dtype)
            if phase == "fwd" and len(rs) == 2:
                b = torch.randn(rs[::-1], generator=gen).to(dtype).T     # a weight (out, in), read transposed
            else:
                b = torch.randn(rs, generator=gen).to(dtype)
            seconds[phase, name] = time_alone(a, b, reps)
    total = sum(s for (phase, _), s in seconds.items() if phase == "fwd") * cfg.n_layer
    if kind == "lora":
        total += sum(s for (phase, _), s in seconds.items() if phase == "bwd") * cfg.n_layer
        total -= sum(seconds["bwd", f"d{n}"] for n in ("q", "k", "v"))        # block 0 needs no input grad
    return total


# ----------------------------------------------------------------------------------------------
# Products inside our step
# ----------------------------------------------------------------------------------------------

class ProductTimer(TorchDispatchMode):
    """Wall time of every product op that runs under it (ops it calls inside are not seen twice: a mode is
    off while its handler runs)."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls = 0.0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in PRODUCT_OPS:
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def measure(mode: str, bases: dict, batch, cfg: hb.BenchConfig, steps: int, reps: int,
            compile_blocks: bool = False) -> dict:
    kind, bf16 = hb.MODES[mode]
    device = torch.device("cpu")
    with contextlib.ExitStack() as hold:
        setups = {s: hb.prepare(s, bases[s], mode, cfg, hold) for s in ("ours", "hf")}
        for s, (m, opt) in setups.items():                            # warm-up, AdamW state
            hb.time_one(s, m, opt, batch, bf16, device)
        times = {"ours": [], "hf": []}
        for i in range(steps):
            for s in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                times[s].append(hb.time_one(s, *setups[s], batch, bf16, device))
        timer = ProductTimer()
        with timer:
            hb.time_one("ours", *setups["ours"], batch, bf16, device)
        compiled = compile_s = None
        if compile_blocks:                       # the same step with each block compiled (torch.compile)
            # The 30 blocks share one forward, so dynamo keeps a graph per block (their inputs differ in
            # requires_grad at block 0, and in identity): let it keep them all, from a clean slate.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = 4 * len(bases["ours"].backbone.blocks)
            model, opt = hb.prepare("ours", bases["ours"], mode, cfg, hold)
            for block in model.backbone.blocks:
                block.compile()
            t = time.perf_counter()
            for _ in range(2):                                        # compiles (forward and backward)
                hb.time_one("ours", model, opt, batch, bf16, device)
            compile_s = time.perf_counter() - t
            compiled = statistics.median(hb.time_one("ours", model, opt, batch, bf16, device) for _ in range(steps))
    B, T = batch.input_ids.shape
    gpt = bases["ours"].backbone
    alone = products_alone(gpt.cfg, B, T, torch.bfloat16 if bf16 else torch.float32, kind, reps)
    flops = common.step_flops(kind, common.non_embedding_params(gpt), gpt.cfg.n_layer, gpt.cfg.d_model, B, T)
    return {"mode": mode, "B": B, "T": T, "ours_s": statistics.median(times["ours"]),
            "hf_s": statistics.median(times["hf"]), "products_in_step_s": timer.seconds,
            "product_calls": timer.calls, "products_alone_s": alone, "model_flops": flops,
            "ours_blocks_compiled_s": compiled, "compile_s": compile_s}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def render(res: dict) -> str:
    peak = res["peak_flops"]
    lines = [
        "# Where a step's time goes: products and the rest",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}  ",
        f"Machine: {res['machine']['cpu']}, torch threads {res['threads']}, torch {res['machine']['torch']}, "
        f"transformers {res['versions']['transformers']}, peft {res['versions']['peft']}  ",
        f"Matmul peak (2048³, this run): fp32 {common.gflops(peak['fp32'])}, bf16 {common.gflops(peak['bf16'])} GFLOP/s. "
        f"Same batches and LoRA (r = {res['config']['lora_r']} on q, v + head) as `bench_vs_hf.py`.",
        "",
        "| step | B × T | ours (ms) | reference (ms) | ours / ref | products in our step (ms) | "
        "products alone (ms) | MFU ours | MFU, products in step only | MFU, products alone only | "
        "ours / ref, products in step only |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        pk = peak["bf16" if "bf16" in r["mode"] else "fp32"]
        mfu = lambda s: f"{100 * r['model_flops'] / s / pk:.0f}%"              # noqa: E731
        lines.append(
            f"| {r['mode']} | {r['B']} × {r['T']} | {1e3 * r['ours_s']:.0f} | {1e3 * r['hf_s']:.0f} | "
            f"{r['hf_s'] / r['ours_s']:.2f}× | {1e3 * r['products_in_step_s']:.0f} | {1e3 * r['products_alone_s']:.0f} | "
            f"{mfu(r['ours_s'])} | {mfu(r['products_in_step_s'])} | {mfu(r['products_alone_s'])} | "
            f"{r['hf_s'] / r['products_in_step_s']:.2f}× |")
    compiled = [r for r in res["rows"] if r["ours_blocks_compiled_s"]]
    if compiled:
        lines += ["", "With each of our blocks compiled (`--compile`, `torch.compile` of every `DecoderBlock`, "
                  "which fuses the work between the products; not something the library does):", "",
                  "| step | B × T | ours, compiled (ms) | ours / ref | MFU | first two steps, compiling (s) |", "|---|---|---|---|---|---|"]
        for r in compiled:
            pk = peak["bf16" if "bf16" in r["mode"] else "fp32"]
            s = r["ours_blocks_compiled_s"]
            lines.append(f"| {r['mode']} | {r['B']} × {r['T']} | {1e3 * s:.0f} | {r['hf_s'] / s:.2f}× | "
                         f"{100 * r['model_flops'] / s / pk:.0f}% | {r['compile_s']:.0f} |")
    lines += ["", "Read: \"products in step only\" is what ours would reach if everything between the products "
              "(norms, rotary, SwiGLU, casts, softmax, autograd's bookkeeping, AdamW) took no time and the "
              "products ran as they do in the step; \"products alone only\", as they run alone with warm caches. "
              "MFU = model FLOPs / time / matmul peak, FLOPs as in `bench_vs_hf.py` (" + common.FLOP_FORMULA + ").",
              ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="auto", help="torch threads (auto: idle cores)")
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=5, help="timed whole steps per stack (median)")
    p.add_argument("--reps", type=int, default=20, help="timed runs of each product alone (median)")
    p.add_argument("--compile", action="store_true", help="also time our step with each block torch.compile'd")
    p.add_argument("--out-dir", default=str(hb.HERE))
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if a.compile:          # compile from scratch, so "compiling took" is what a first run pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="w2s-inductor-")
        torch._inductor.config.fx_graph_cache = False
    threads = common.set_threads(a.threads)
    device = torch.device("cpu")
    cfg = hb.BenchConfig(threads=str(threads))
    machine = common.machine_info(device)
    peak = {"fp32": common.matmul_peak(torch.float32, device)["peak_flops"],
            "bf16": common.matmul_peak(torch.bfloat16, device)["peak_flops"]}
    gpt, tokenizer = models.load_student(cfg.student)
    clf = models.Classifier(gpt, hb.N_LABELS, generator=torch.Generator().manual_seed(cfg.seed)).eval()
    bases = {"ours": clf, "hf": hb.build_hf(clf, tokenizer.pad_id)}
    hb.check_parity(clf, bases["hf"], hb.parity_batch(tokenizer, cfg), "before timing")
    rows = []
    for B in (int(x) for x in a.batch_sizes.split(",")):
        batch = hb.make_batches(tokenizer, cfg, B, 1)[0]
        for mode in modes:
            r = measure(mode, bases, batch, cfg, a.steps, a.reps, a.compile)
            print(f"{mode} B={r['B']} T={r['T']}: ours {1e3 * r['ours_s']:.0f} ms (products "
                  f"{1e3 * r['products_in_step_s']:.0f} ms in step, {1e3 * r['products_alone_s']:.0f} ms alone), "
                  f"reference {1e3 * r['hf_s']:.0f} ms", flush=True)
            rows.append(r)
    res = {"command": ".venv/bin/python bench/matmul_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine, "threads": threads,
           "versions": {k: common.package_version(k) for k in ("transformers", "peft")},
           "config": {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "steps": a.steps, "reps": a.reps,
                      "compile": a.compile},
           "peak_flops": peak, "rows": rows}
    out = Path(a.out_dir)
    common.write_atomic(out / "RESULTS_ceiling.md", render(res))
    common.write_json_atomic(out / "results_ceiling.json", res)
    print(render(res))


if __name__ == "__main__":
    main()
