"""Our student against the reference stack (transformers + peft) on the same weights and the same batches.

What it does, in order:

1. Load the default student (SmolLM2-135M, GGUF, dequantized to float32) into our ``GPT`` + ``Classifier``;
   build a ``transformers`` ``LlamaForSequenceClassification`` (sdpa attention) from the SAME tensors
   (our names mapped to Hugging Face names) and the same head (``score`` = our ``head``).
2. Parity: the two models' logits on one padded batch of real SST-2 sentences must agree
   (``allclose(atol=1e-4, rtol=1e-4)``), before and after LoRA is attached; otherwise abort.
3. Measure the matmul peak FLOP/s (fp32 and bf16) in this run.
4. Time, alternating ours and theirs on the same batch: a LoRA step (r=8, alpha=16, q/v + trainable head;
   forward + backward + AdamW) in fp32 and bf16 autocast, a full fine-tuning step (bf16 autocast) and
   inference (``torch.inference_mode``, bf16 autocast), at batch 16 and 32. Warm-up first, then several
   timed steps; the median is reported.
5. Peak RSS of each (stack, mode) in a SEPARATE fresh process (both load the same safetensors folder),
   so that one stack's memory is never counted for the other.
6. Write ``bench/RESULTS.md`` and ``bench/results.json`` (atomically).

Run:  .venv/bin/python bench/bench_vs_hf.py            (full)
      .venv/bin/python bench/bench_vs_hf.py --quick    (smoke run, about a minute or two)
Reference libraries (transformers, peft) are bench-only dependencies: requirements-bench.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
import torch.nn.functional as F

import data
import lora
import models
import train

HERE = Path(__file__).resolve().parent
N_LABELS = 2
PARITY_TOL = 1e-4

# mode name -> (kind of step, bf16 autocast)
MODES = {
    "lora_fp32": ("lora", False),
    "lora_bf16": ("lora", True),
    "full_bf16": ("full", True),
    "infer_bf16": ("infer", True),
}


@dataclass
class BenchConfig:
    """Everything that decides the numbers; printed and saved beside them."""
    student: str = "smollm2-135m"
    dataset: str = "sst2"
    max_length: int = 64
    batch_sizes: tuple = (16, 32)
    modes: tuple = tuple(MODES)
    bf16_batch_sizes: tuple | None = None  # None: batch_sizes, or only the smallest where bf16 is emulated
    steps: int = 3                 # timed steps per (mode, batch size, stack); the median is reported
    bf16_steps: int | None = None  # None: same as steps
    config_budget_s: float = 30.0  # stop adding timed steps to a (mode, B) once this is spent (>= 1 step)
    warmup: str = "small"          # "small": one step on 2 rows of the first batch; "full": a whole batch
    lora_r: int = 8
    lora_alpha: float = 16
    lora_targets: tuple = ("q_proj", "v_proj")
    lr: float = 1e-4
    rss_modes: tuple | None = None  # None: all modes, or only the LoRA ones where bf16 is emulated
    rss_batch_size: int = 16
    rss_steps: int = 1
    seed: int = 0
    device: str = "auto"
    threads: str = "auto"          # torch intra-op threads; "auto" = idle cores (see common.set_threads)
    quick: bool = False


# ----------------------------------------------------------------------------------------------
# The two stacks, built from the same tensors
# ----------------------------------------------------------------------------------------------

def hf_config(cfg: models.GPTConfig, pad_id: int):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        num_labels=N_LABELS, pad_token_id=pad_id, attn_implementation="sdpa")


def hf_state_dict(clf: models.Classifier) -> dict:
    """Our names -> Hugging Face ``LlamaForSequenceClassification`` names (same tensors, no copy)."""
    ours = clf.backbone.state_dict()
    hf = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm_f.weight"],
          "score.weight": clf.head.weight.detach()}
    for i in range(clf.backbone.cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        hf[h + "input_layernorm.weight"] = ours[o + "norm1.weight"]
        hf[h + "post_attention_layernorm.weight"] = ours[o + "norm2.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hf[h + f"self_attn.{p}.weight"] = ours[o + f"attn.{p}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj"):
            hf[h + f"mlp.{p}.weight"] = ours[o + f"mlp.{p}.weight"]
    return hf


def build_hf(clf: models.Classifier, pad_id: int):
    from transformers import LlamaForSequenceClassification
    hf = LlamaForSequenceClassification(hf_config(clf.backbone.cfg, pad_id)).float()
    result = hf.load_state_dict(hf_state_dict(clf), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"name mapping to Hugging Face is incomplete: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    return hf.eval()


def add_lora(stack: str, model, cfg: BenchConfig):
    """Attach LoRA (same r, alpha, targets; head/score trainable). Returns the model to call."""
    if stack == "ours":
        lora.inject_lora(model, targets=cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                         generator=torch.Generator().manual_seed(cfg.seed), trainable=("head",))
        return model
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(cfg.seed)
    pc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                    lora_dropout=0.0, modules_to_save=["score"])
    return get_peft_model(model, pc)


def logits_of(stack: str, model, ids, mask):
    if stack == "ours":
        return model(ids, mask)
    return model(input_ids=ids, attention_mask=mask).logits


def prepare(stack: str, base, mode: str, cfg: BenchConfig, hold: contextlib.ExitStack):
    """A fresh copy of ``base`` set up for ``mode``, as each stack's own training loop sets it up:
    (model, optimizer or None).

    The optimizer: ours is ``train.make_optimizer`` (what ``train.fit`` uses: torch's fused AdamW on a CPU);
    the reference's is torch's fused AdamW too, the ``transformers.Trainer`` default with torch >= 2.8
    (``optim="adamw_torch_fused"``), so the two update alike. In bf16, ours holds its frozen linear weights in
    bf16 (all of them for inference) for as long as ``hold`` stays open, as ``train.fit`` and ``train.predict``
    do for a whole run (``train.bf16_weights``); the reference keeps float32 weights under autocast, as peft
    on a float32 model does.
    """
    kind, bf16 = MODES[mode]
    model = copy.deepcopy(base)
    if kind == "infer":
        model.eval()
    elif kind == "lora":
        model = add_lora(stack, model, cfg).train()
    else:
        model.requires_grad_(True).train()
    if stack == "ours" and bf16:
        hold.enter_context(train.bf16_weights(model, frozen_only=kind != "infer"))
    if kind == "infer":
        return model, None
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    if stack == "ours":
        return model, train.make_optimizer(params, cfg.lr, 0.01, device)
    return model, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=device.type in ("cpu", "cuda") or None)


def step(stack: str, model, optimizer, ids, mask, labels, bf16: bool, device):
    """One inference pass (optimizer None) or one training step: forward, CE, backward, AdamW."""
    if optimizer is None:
        with torch.inference_mode(), train.autocast(device, bf16):
            logits_of(stack, model, ids, mask)
        return
    with train.autocast(device, bf16):
        logits = logits_of(stack, model, ids, mask)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ----------------------------------------------------------------------------------------------
# Data: the same batches of real sentences for both stacks
# ----------------------------------------------------------------------------------------------

def make_batches(tokenizer, cfg: BenchConfig, batch_size: int, n: int):
    """``n`` dynamically right-padded batches of SST-2 training sentences, as ``train.batches`` makes them
    (length-bucketed, shuffled with the seed).

    Which ``n``: the batches whose padded length T is nearest the MEDIAN over one epoch, so that a few
    timed steps cost what a typical step costs (``--quick``: the SHORTEST batches, a smoke run only).
    """
    split = data.load_dataset(cfg.dataset).train
    enc = train.encode(tokenizer, split.sentences, split.labels, max_length=cfg.max_length, padding_side="right")
    epoch = [b for b in train.batches(enc, batch_size, shuffle=True, rng=random.Random(cfg.seed))
             if b.input_ids.shape[0] == batch_size]
    epoch.sort(key=lambda b: b.input_ids.shape[1])                     # stable: ties keep the shuffled order
    mid = 0 if cfg.quick else max(0, len(epoch) // 2 - n // 2)
    return epoch[mid:mid + n]


@torch.no_grad()
def copy_lora_weights(ours, peft_model, seed: int):
    """Give our LoRA a nonzero B (seeded) and copy our A, B into peft's lora_A / lora_B, so that the LoRA
    parity check tests the update path too (with B = 0 both would trivially equal the base model)."""
    g = torch.Generator().manual_seed(seed + 1)
    theirs = dict(peft_model.named_parameters())
    n = 0
    for name, m in lora.lora_modules(ours):
        m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.02)
        i, proj = name.split(".")[2], name.rsplit(".", 1)[-1]          # "backbone.blocks.{i}.attn.{proj}"
        prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
        theirs[f"{prefix}.lora_A.default.weight"].copy_(m.A)             # (r, in)
        theirs[f"{prefix}.lora_B.default.weight"].copy_(m.B)             # (out, r)
        n += 1
    if n == 0:
        raise RuntimeError("no LoRA layer found in our model")


def parity_batch(tokenizer, cfg: BenchConfig, n: int = 8):
    """The first ``n`` training sentences, unsorted, so the batch mixes lengths and has right padding."""
    split = data.load_dataset(cfg.dataset).train
    enc = train.encode(tokenizer, split.sentences[:n], split.labels[:n], max_length=cfg.max_length)
    b = train.collate(enc, list(range(n)))
    if bool(b.attention_mask.all()):
        raise RuntimeError("the parity batch has no padding; pick sentences of different lengths")
    return b


def check_parity(ours, hf, batch, where: str):
    with torch.inference_mode():
        z_ours = logits_of("ours", ours, batch.input_ids, batch.attention_mask).float()
        z_hf = logits_of("hf", hf, batch.input_ids, batch.attention_mask).float()
    diff = (z_ours - z_hf).abs().max().item()
    ok = torch.allclose(z_ours, z_hf, atol=PARITY_TOL, rtol=PARITY_TOL)
    print(f"parity {where}: max |z_ours - z_hf| = {diff:.2e} on a ({tuple(batch.input_ids.shape)}) batch "
          f"-> {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        raise SystemExit(f"parity check failed {where}: max abs logit difference {diff:.3e} > {PARITY_TOL}; "
                         f"the two stacks do not compute the same function, timings would be meaningless")
    return diff


# ----------------------------------------------------------------------------------------------
# Timing (alternating ours / theirs)
# ----------------------------------------------------------------------------------------------

def time_one(stack, model, opt, b, bf16, device):
    common.sync(device)
    t = time.perf_counter()
    step(stack, model, opt, b.input_ids, b.attention_mask, b.labels, bf16, device)
    common.sync(device)
    return time.perf_counter() - t


def time_mode(mode, bases, batches, cfg: BenchConfig, device, steps: int):
    """Median tokens/s of each stack over ``steps`` batches; each batch is run by both stacks, the order
    alternating between steps so that neither always runs second on a shared, noisy machine."""
    kind, bf16 = MODES[mode]
    hold = contextlib.ExitStack()
    setups = {s: prepare(s, bases[s], mode, cfg, hold) for s in ("ours", "hf")}
    w = batches[0]
    if cfg.warmup == "small":
        w = train.Batch(w.input_ids[:2], w.attention_mask[:2], w.labels[:2], w.index[:2])
    for s, (m, opt) in setups.items():                 # warm-up (also allocates AdamW state)
        time_one(s, m, opt, w, bf16, device)
    times = {"ours": [], "hf": []}
    tokens = []
    t0 = time.perf_counter()
    for i in range(steps):
        if i > 0 and time.perf_counter() - t0 > cfg.config_budget_s:
            break
        b = batches[i % len(batches)]
        tokens.append(b.input_ids.numel())
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for s in order:
            times[s].append(time_one(s, *setups[s], b, bf16, device))
        print(f"  {mode} B={b.input_ids.shape[0]} T={b.input_ids.shape[1]} step {i}: "
              f"ours {times['ours'][-1]:.2f}s  hf {times['hf'][-1]:.2f}s", flush=True)
    hold.close()
    del setups
    gc.collect()
    out = {"mode": mode, "kind": kind, "bf16": bf16, "steps": len(tokens), "tokens_per_step": tokens,
           "mean_T": sum(t / batches[0].input_ids.shape[0] for t in tokens) / len(tokens)}
    for s in times:
        out[f"{s}_seconds"] = times[s]
        out[f"{s}_tokens_per_s"] = common.median([n / t for n, t in zip(tokens, times[s])])
    out["speedup"] = out["ours_tokens_per_s"] / out["hf_tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------
# Peak RSS: one fresh process per (stack, mode)
# ----------------------------------------------------------------------------------------------

def child_main(args):
    """Load one stack from the shared safetensors folder, set up one mode, run a few steps, report RSS."""
    cfg = BenchConfig(**json.loads(Path(args.config).read_text()))
    common.set_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    folder = Path(args.model_dir)
    rss_start = common.rss_mb()
    if args.stack == "ours":
        import weights
        # No other name may keep the loaded backbone alive: prepare() deep-copies the model, as for HF.
        model = models.Classifier(models.load_decoder(folder)[0], N_LABELS)
        with torch.no_grad():
            model.head.weight.copy_(weights.read_safetensors(folder / "model.safetensors", ["score.weight"])["score.weight"])
    else:
        from transformers import LlamaForSequenceClassification
        model = LlamaForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    model = model.to(device)
    model, opt = prepare(args.stack, model, args.mode, cfg, contextlib.ExitStack())   # held until exit
    _, bf16 = MODES[args.mode]
    rows = json.loads(Path(args.batches).read_text())
    batches = [train.Batch(torch.tensor(r["ids"]), torch.tensor(r["mask"]), torch.tensor(r["labels"]),
                           torch.arange(len(r["ids"]))) for r in rows]
    gc.collect()
    rss_ready = common.rss_mb()
    peak_load = common.peak_rss_mb()
    resettable = common.reset_peak_rss()
    for i in range(args.steps):
        b = batches[i % len(batches)].to(device)
        step(args.stack, model, opt, b.input_ids, b.attention_mask, b.labels, bf16, device)
    common.child_result({"stack": args.stack, "mode": args.mode, "rss_start_mb": rss_start,
                         "rss_ready_mb": rss_ready, "peak_load_mb": peak_load,
                         "peak_steps_mb": common.peak_rss_mb(), "peak_resettable": resettable})


def measure_rss(cfg: BenchConfig, workdir: Path, batches) -> list[dict]:
    cfg_path, batch_path = workdir / "config.json.bench", workdir / "batches.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))
    batch_path.write_text(json.dumps([{"ids": b.input_ids.tolist(), "mask": b.attention_mask.tolist(),
                                       "labels": b.labels.tolist()} for b in batches]))
    out = []
    for mode in cfg.rss_modes:
        for stack in ("ours", "hf"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stack, mode,
                   "--model-dir", str(workdir), "--config", str(cfg_path), "--batches", str(batch_path),
                   "--steps", str(cfg.rss_steps)]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"RSS child {stack}/{mode} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            r = common.parse_child(p.stdout)
            r["wall_s"] = time.perf_counter() - t
            print(f"  rss {stack:4s} {mode:10s}: ready {r['rss_ready_mb']:.0f} MiB, "
                  f"peak during steps {r['peak_steps_mb']:.0f} MiB ({r['wall_s']:.0f}s)", flush=True)
            out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def mfu(tokens_per_s, kind, n_params, n_layer, d_attn, mean_T, peak):
    """Model FLOP/s utilisation: FLOPs of the step (common.step_flops) per second / matmul peak."""
    flops_per_token = common.step_flops(kind, n_params, n_layer, d_attn, 1, round(mean_T)) / round(mean_T)
    return tokens_per_s * flops_per_token / peak


def render(res: dict) -> str:
    m, cfg = res["machine"], res["config"]
    lines = [
        "# Ours vs. transformers + peft (same weights, same batches)",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}  ",
        f"Machine: {m['cpu']}, {m['cpu_affinity']} usable cores, torch threads {cfg['threads']}, "
        f"device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, native bf16 on CPU: "
        f"{m['native_bf16_cpu']}, SIMD {', '.join(m['simd'])}, load average at start {m['load_avg_1m_at_start']}  ",
        f"Versions: python {m['python']}, torch {m['torch']}, transformers {res['versions']['transformers']}, "
        f"peft {res['versions']['peft']}  ",
        f"Model: {cfg['student']} ({res['n_params_total'] / 1e6:.1f} M params, N = {res['n_params_nonembedding'] / 1e6:.1f} M "
        f"non-embedding), LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']:g} on {', '.join(cfg['lora_targets'])} "
        f"+ trainable head; data: real {cfg['dataset']} train sentences (≤ {cfg['max_length']} tokens), "
        f"length-bucketed, dynamic right padding; {'QUICK run' if cfg['quick'] else 'full run'}",
        "",
        f"Parity before timing: max |logits_ours − logits_hf| = {res['parity']['base']:.1e} (base), "
        f"{res['parity']['lora']:.1e} (with LoRA), tolerance {PARITY_TOL:g}.",
        "",
        f"Matmul peak (this run): fp32 {common.gflops(res['peak']['fp32']['peak_flops'])} GFLOP/s "
        f"(n={res['peak']['fp32']['n']}), bf16 {common.gflops(res['peak']['bf16']['peak_flops'])} GFLOP/s "
        f"(n={res['peak']['bf16']['n']}; NN {common.gflops(res['peak']['bf16']['flops_NN'])}, "
        f"NT {common.gflops(res['peak']['bf16']['flops_NT'])}).",
        "",
        "## Throughput (tokens/s, median over timed steps; tokens = B × T including padding)",
        "",
        "| mode | B | mean T | steps | ours tok/s | HF tok/s | ours / HF | MFU ours | MFU HF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["timings"]:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['mean_T']:.1f} | {r['steps']} | "
                     f"{r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
                     f"{100 * r['mfu_ours']:.1f}% | {100 * r['mfu_hf']:.1f}% |")
    lines += ["", f"MFU = model FLOPs / time / matmul peak of the step's dtype. {common.FLOP_FORMULA}.", ""]
    if res["rss"]:
        lines += ["## Peak RSS (one fresh process per stack and mode, both loading the same safetensors folder)",
                  "",
                  f"B = {cfg['rss_batch_size']}, {cfg['rss_steps']} step(s). 'ready' = RSS once the model and "
                  "optimizer are built; 'peak' = the highest RSS while stepping (VmHWM reset after setup).",
                  "",
                  "| mode | ours ready MiB | ours peak MiB | HF ready MiB | HF peak MiB | ours / HF (peak) | "
                  "ours / HF (peak − ready) |",
                  "|---|---|---|---|---|---|---|"]
        by = {(r["stack"], r["mode"]): r for r in res["rss"]}
        for mode in cfg["rss_modes"]:
            o, h = by[("ours", mode)], by[("hf", mode)]
            lines.append(f"| {mode} | {o['rss_ready_mb']:.0f} | {o['peak_steps_mb']:.0f} | {h['rss_ready_mb']:.0f} | "
                         f"{h['peak_steps_mb']:.0f} | {o['peak_steps_mb'] / h['peak_steps_mb']:.2f} | "
                         f"{(o['peak_steps_mb'] - o['rss_ready_mb']) / max(1e-9, h['peak_steps_mb'] - h['rss_ready_mb']):.2f} |")
        lines.append("")
    lines += ["## Summary", "", "```json", json.dumps(res["summary"], indent=2), "```", ""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def summarise(res: dict) -> dict:
    t = {(r["mode"], r["batch_size"]): r for r in res["timings"]}

    def speedup(mode):
        rs = [r for (m, _), r in t.items() if m == mode]
        return common.median([r["speedup"] for r in rs]) if rs else None

    s = {"lora_speedup_fp32": speedup("lora_fp32"), "lora_speedup_bf16": speedup("lora_bf16"),
         "inference_speedup": speedup("infer_bf16"), "full_ft_speedup": speedup("full_bf16")}
    by = {(r["stack"], r["mode"]): r for r in res["rss"]}
    for mode in ("lora_bf16", "lora_fp32"):
        if ("ours", mode) in by:
            s["rss_ratio"] = by[("ours", mode)]["peak_steps_mb"] / by[("hf", mode)]["peak_steps_mb"]
            s["rss_ratio_mode"] = mode
            s["rss_step_delta_ratio"] = ((by[("ours", mode)]["peak_steps_mb"] - by[("ours", mode)]["rss_ready_mb"])
                                         / (by[("hf", mode)]["peak_steps_mb"] - by[("hf", mode)]["rss_ready_mb"]))
            break
    lb = [r for (m, _), r in t.items() if m == "lora_bf16"]
    s["mfu_bf16_lora"] = max((r["mfu_ours"] for r in lb), default=None)
    s["tokens_per_s"] = {f"{m}_B{b}": {"ours": r["ours_tokens_per_s"], "hf": r["hf_tokens_per_s"]}
                         for (m, b), r in t.items()}
    s["speedup_definition"] = "ours tokens/s / reference tokens/s (median over batch sizes); > 1 = ours faster"
    return s


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    p.add_argument("--quick", action="store_true", help="smoke run: B=8, the shortest batches, 1 timed step, RSS for LoRA bf16 only")
    p.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)))
    p.add_argument("--bf16-batch-sizes", default=None, help="batch sizes for bf16 modes (default: --batch-sizes)")
    p.add_argument("--modes", default=",".join(d.modes), help=f"subset of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--bf16-steps", type=int, default=None)
    p.add_argument("--config-budget-s", type=float, default=d.config_budget_s,
                   help="time per (mode, batch size) after which no further timed step starts")
    p.add_argument("--warmup", choices=("small", "full"), default=d.warmup)
    p.add_argument("--rss-modes", default=None,
                   help="modes measured in separate processes ('' = none; default all, or lora_fp32,lora_bf16 "
                        "where bf16 is emulated)")
    p.add_argument("--rss-batch-size", type=int, default=d.rss_batch_size)
    p.add_argument("--rss-steps", type=int, default=d.rss_steps)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", default=d.threads, help="torch threads, or 'auto' (idle cores)")
    p.add_argument("--out-dir", default=str(HERE))
    p.add_argument("--profile", action="store_true", help="also profile one LoRA bf16 step of ours (torch.profiler)")
    # internal: a child process measuring the RSS of one (stack, mode)
    p.add_argument("--child", nargs=2, metavar=("STACK", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def config_from_args(a) -> BenchConfig:
    cfg = BenchConfig(batch_sizes=ints(a.batch_sizes), modes=tuple(m for m in a.modes.split(",") if m),
                      bf16_batch_sizes=ints(a.bf16_batch_sizes) if a.bf16_batch_sizes else None,
                      steps=a.steps, bf16_steps=a.bf16_steps, config_budget_s=a.config_budget_s, warmup=a.warmup,
                      rss_modes=None if a.rss_modes is None else tuple(m for m in a.rss_modes.split(",") if m),
                      rss_batch_size=a.rss_batch_size,
                      rss_steps=a.rss_steps, device=a.device, threads=a.threads, quick=a.quick)
    if a.quick:
        cfg.batch_sizes, cfg.bf16_batch_sizes, cfg.steps, cfg.bf16_steps = (8,), (8,), 1, 1
        cfg.rss_batch_size = 8
        cfg.rss_modes = ("lora_bf16",)
    unknown = [m for m in cfg.modes + (cfg.rss_modes or ()) if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    return cfg


def profile_lora_bf16(bases, batch, cfg, device, out_dir: Path):
    """torch.profiler on one LoRA bf16 training step of OUR model; returns the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    model, opt = prepare("ours", bases["ours"], "lora_bf16", cfg, contextlib.ExitStack())
    step("ours", model, opt, batch.input_ids[:2], batch.attention_mask[:2], batch.labels[:2], True, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step("ours", model, opt, batch.input_ids, batch.attention_mask, batch.labels, True, device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    common.write_atomic(out_dir / "profile_lora_bf16_ours.txt", table + "\n")
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
    common.write_atomic(out_dir / "profile_lora_bf16_ours_by_shape.txt", by_shape + "\n")
    print(table, flush=True)


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        a.stack, a.mode = a.child
        return child_main(a)
    cfg = config_from_args(a)
    cfg.threads = str(common.set_threads(cfg.threads))   # resolved once; the RSS children use the same
    out_dir = Path(a.out_dir)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    print("config:", json.dumps(asdict(cfg)), flush=True)
    machine = common.machine_info(device)
    print("machine:", json.dumps(machine), flush=True)

    peak = {"fp32": common.matmul_peak(torch.float32, device), "bf16": common.matmul_peak(torch.bfloat16, device)}
    print(f"matmul peak: fp32 {common.gflops(peak['fp32']['peak_flops'])} GFLOP/s, "
          f"bf16 {common.gflops(peak['bf16']['peak_flops'])} GFLOP/s", flush=True)
    notes = []
    emulated = peak["bf16"]["peak_flops"] < 0.5 * peak["fp32"]["peak_flops"]
    if emulated:
        notes.append(f"bf16 is EMULATED on this device: its matmul peak is "
                     f"{peak['fp32']['peak_flops'] / peak['bf16']['peak_flops']:.1f}× below fp32 (no avx512_bf16/AMX "
                     "on CPU), for both stacks alike. bf16 rows compare the stacks, not what bf16 is worth on a GPU.")
    if cfg.bf16_batch_sizes is None:
        cfg.bf16_batch_sizes = (min(cfg.batch_sizes),) if emulated else cfg.batch_sizes
        if emulated and cfg.bf16_batch_sizes != cfg.batch_sizes:
            notes.append(f"To keep the default run short, bf16 modes ran at B = {cfg.bf16_batch_sizes} only "
                         "(--bf16-batch-sizes 16,32 for both).")
    if cfg.rss_modes is None:
        cfg.rss_modes = ("lora_fp32",) if emulated else tuple(MODES)
        if emulated:
            notes.append("To keep the default run short, peak RSS was measured for LoRA fp32 only "
                         "(--rss-modes lora_fp32,lora_bf16,full_bf16,infer_bf16 for all).")
    print("resolved config:", json.dumps(asdict(cfg)), flush=True)

    gpt, tokenizer = models.load_student(cfg.student)
    clf = models.Classifier(gpt, N_LABELS, generator=torch.Generator().manual_seed(cfg.seed)).eval()
    hf = build_hf(clf, tokenizer.pad_id)
    clf, hf = clf.to(device), hf.to(device)
    bases = {"ours": clf, "hf": hf}
    n_total = sum(p.numel() for p in clf.parameters())
    N = common.non_embedding_params(gpt)

    all_bs = sorted(set(cfg.batch_sizes) | set(cfg.bf16_batch_sizes or ()) | {cfg.rss_batch_size})
    n_batches = max(cfg.steps, cfg.bf16_steps or 0, cfg.rss_steps, 1)
    batches = {bs: [b.to(device) for b in make_batches(tokenizer, cfg, bs, n_batches)] for bs in all_bs}

    b0 = parity_batch(tokenizer, cfg).to(device)
    parity = {"base": check_parity(clf, hf, b0, "before LoRA")}
    lora_ours, lora_hf = add_lora("ours", copy.deepcopy(clf), cfg), add_lora("hf", copy.deepcopy(hf), cfg)
    copy_lora_weights(lora_ours, lora_hf, cfg.seed)
    parity["lora"] = check_parity(lora_ours.eval(), lora_hf.eval(), b0, "with LoRA attached (same nonzero A, B)")
    n_lora = {"ours": lora.count_trainable(lora_ours), "hf": sum(p.numel() for p in lora_hf.parameters() if p.requires_grad)}
    print(f"trainable parameters with LoRA: ours {n_lora['ours']}, peft {n_lora['hf']}", flush=True)
    del lora_ours, lora_hf

    timings = []
    for mode in cfg.modes:
        kind, bf16 = MODES[mode]
        sizes = (cfg.bf16_batch_sizes or cfg.batch_sizes) if bf16 else cfg.batch_sizes
        steps = (cfg.bf16_steps or cfg.steps) if bf16 else cfg.steps
        for bs in sizes:
            r = time_mode(mode, bases, batches[bs], cfg, device, steps)
            r["batch_size"] = bs
            pk = peak["bf16" if bf16 else "fp32"]["peak_flops"]
            for s in ("ours", "hf"):
                r[f"mfu_{s}"] = mfu(r[f"{s}_tokens_per_s"], kind, N, gpt.cfg.n_layer, gpt.cfg.d_model, r["mean_T"], pk)
            print(f"{mode} B={bs}: ours {r['ours_tokens_per_s']:.0f} tok/s, hf {r['hf_tokens_per_s']:.0f} tok/s, "
                  f"ours/hf {r['speedup']:.2f}, MFU ours {100 * r['mfu_ours']:.1f}%", flush=True)
            timings.append(r)

    if a.profile:
        profile_lora_bf16(bases, batches[cfg.batch_sizes[0]][0], cfg, device, out_dir)

    rss = []
    if cfg.rss_modes:
        with tempfile.TemporaryDirectory(prefix="w2s-bench-") as tmp:
            workdir = Path(tmp)
            hf.cpu().save_pretrained(workdir)                # safetensors + config.json, read by both children
            del bases, hf, clf
            gc.collect()
            rss = measure_rss(cfg, workdir, [b.to("cpu") for b in batches[cfg.rss_batch_size][:cfg.rss_steps]])

    res = {"command": " ".join([".venv/bin/python"] + [shlex.quote(x) for x in ["bench/bench_vs_hf.py"] + sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine, "config": asdict(cfg),
           "versions": {k: common.package_version(k) for k in ("transformers", "peft", "torch")},
           "n_params_total": n_total, "n_params_nonembedding": N, "trainable_lora": n_lora,
           "flop_formula": common.FLOP_FORMULA, "parity": parity, "peak": peak, "timings": timings, "rss": rss,
           "wall_s": None, "notes": notes}
    res["summary"] = summarise(res)
    res["wall_s"] = time.perf_counter() - t_start
    res["notes"].append(f"Total wall time {res['wall_s']:.0f} s. Shared machine: absolute numbers are noisy, the "
                        "ours/HF ratios (same batches, alternating order) are what to read.")
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json_atomic(out_dir / "results.json", res)
    common.write_atomic(out_dir / "RESULTS.md", render(res))
    print(render(res))


if __name__ == "__main__":
    main()
