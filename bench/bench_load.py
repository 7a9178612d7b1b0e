"""Load time, peak memory and forward throughput of the default student (and the teacher's load time).

Targets (the issue): loading the default student <= 10 s and <= 1.5 GB peak RSS; the teacher <= 3 s;
student forward throughput at batch 32 x 64 tokens, fp32 and bf16 autocast, beside the torch matmul peak
measured in the same run (the ratio is the model FLOP/s utilisation, MFU).

* Load time and peak RSS are measured in a FRESH process per model (so nothing is cached or shared):
  ``import_s`` = importing torch + our modules, ``load_s`` = the ``load_student`` / ``load_teacher`` call,
  ``peak_rss_mb`` = the process's peak resident memory after loading (getrusage / VmHWM, imports included).
* Forward throughput: ``Classifier(student)`` under ``torch.inference_mode``, a fixed seeded (32, 64) batch
  of random token ids (no padding), one warm-up pass, then the median of several timed passes.
  Model FLOPs per pass: ``F = 2 N B T + 2 n_layer T d_model B T`` (common.forward_flops).

Run:  .venv/bin/python bench/bench_load.py            (full)
      .venv/bin/python bench/bench_load.py --quick    (smoke run: batch 4 x 64, one timed pass)
Writes bench/RESULTS_load.md and bench/results_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_T0 = time.perf_counter()
import common  # noqa: E402  (puts the repo root on sys.path; imports torch)
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = {"student_load_s": 10.0, "student_peak_rss_mb": 1.5 * 1000 ** 3 / 1024 ** 2, "teacher_load_s": 3.0}


@dataclass
class LoadBenchConfig:
    student: str = "smollm2-135m"
    teacher: str = "minilm-l6"
    batch_size: int = 32
    seq_len: int = 64
    reps: int = 3                  # timed forward passes per dtype (median reported)
    budget_s: float = 60.0         # no further timed pass starts once a dtype has used this much
    threads: str = "auto"
    device: str = "auto"
    seed: int = 0
    quick: bool = False


# ----------------------------------------------------------------------------------------------
# Child: load one model in a fresh process
# ----------------------------------------------------------------------------------------------

def child_main(role: str, name: str):
    import models
    t_models = time.perf_counter()
    t = time.perf_counter()
    model, tokenizer = models.load_student(name) if role == "student" else models.load_teacher(name)
    load_s = time.perf_counter() - t
    common.child_result({
        "role": role, "name": name, "import_s": t_models - _T0, "load_s": load_s,
        "peak_rss_mb": common.peak_rss_mb(), "rss_after_load_mb": common.rss_mb(),
        "n_params": sum(p.numel() for p in model.parameters()), "vocab": tokenizer.vocab_size
        if hasattr(tokenizer, "vocab_size") else None})


def load_in_fresh_process(role: str, name: str, threads: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, name]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    if p.returncode != 0:
        raise RuntimeError(f"loading the {role} {name!r} in a fresh process failed (exit {p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    r = common.parse_child(p.stdout)
    r["process_wall_s"] = time.perf_counter() - t            # interpreter start + imports + load + exit
    return r


# ----------------------------------------------------------------------------------------------
# Forward throughput
# ----------------------------------------------------------------------------------------------

def forward_throughput(clf, cfg: LoadBenchConfig, device, bf16: bool, peak_flops: float) -> dict:
    import train
    g = torch.Generator().manual_seed(cfg.seed)
    V = clf.backbone.cfg.vocab_size
    ids = torch.randint(0, V, (cfg.batch_size, cfg.seq_len), generator=g).to(device)   # (B, T)
    mask = torch.ones_like(ids)

    def run(x, m):
        common.sync(device)
        t = time.perf_counter()
        with torch.inference_mode(), train.autocast(device, bf16):
            clf(x, m)
        common.sync(device)
        return time.perf_counter() - t

    run(ids[:2], mask[:2])                     # warm-up on 2 rows: kernels and allocator, not a full pass
    times, t0 = [], time.perf_counter()
    for i in range(cfg.reps):
        if i > 0 and time.perf_counter() - t0 > cfg.budget_s:
            break
        times.append(run(ids, mask))
    sec = common.median(times)
    gpt = clf.backbone
    N = common.non_embedding_params(gpt)
    flops = common.forward_flops(N, gpt.cfg.n_layer, gpt.cfg.d_model, cfg.batch_size, cfg.seq_len)
    tokens = cfg.batch_size * cfg.seq_len
    return {"dtype": "bf16" if bf16 else "fp32", "seconds": times, "median_s": sec, "tokens_per_s": tokens / sec,
            "model_flops_per_s": flops / sec, "matmul_peak_flops": peak_flops, "mfu": flops / sec / peak_flops}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def verdict(value, limit):
    return "pass" if value <= limit else "FAIL"


def render(res: dict) -> str:
    m, cfg, s, t = res["machine"], res["config"], res["student_load"], res["teacher_load"]
    lines = [
        "# Load time, peak memory and forward throughput",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}  ",
        f"Machine: {m['cpu']}, {m['cpu_affinity']} usable cores, torch threads {cfg['threads']}, device "
        f"{m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}, native bf16 on CPU: {m['native_bf16_cpu']}, "
        f"load average at start {m['load_avg_1m_at_start']}  ",
        f"Versions: python {m['python']}, torch {m['torch']}",
        "",
        "## Loading (each in a fresh process)",
        "",
        "| model | load call (s) | imports (s) | whole process (s) | peak RSS (MiB) | target | verdict |",
        "|---|---|---|---|---|---|---|",
        f"| student {s['name']} ({s['n_params'] / 1e6:.1f} M) | {s['load_s']:.2f} | {s['import_s']:.2f} | "
        f"{s['process_wall_s']:.2f} | {s['peak_rss_mb']:.0f} | ≤ 10 s, ≤ 1.5 GB ({TARGETS['student_peak_rss_mb']:.0f} MiB) | "
        f"time {verdict(s['load_s'], TARGETS['student_load_s'])}, RSS {verdict(s['peak_rss_mb'], TARGETS['student_peak_rss_mb'])} "
        f"(1.5 GiB = 1536 MiB: {verdict(s['peak_rss_mb'], 1536)}) |",
        f"| teacher {t['name']} ({t['n_params'] / 1e6:.1f} M) | {t['load_s']:.2f} | {t['import_s']:.2f} | "
        f"{t['process_wall_s']:.2f} | {t['peak_rss_mb']:.0f} | ≤ 3 s | time {verdict(t['load_s'], TARGETS['teacher_load_s'])} |",
        "",
        "The verdicts judge the load call; peak RSS includes the interpreter and torch (imports alone are a few "
        "hundred MiB).",
        "",
        f"## Student forward, batch {cfg['batch_size']} × {cfg['seq_len']} tokens (torch.inference_mode)",
        "",
        "| dtype | passes | median s | tokens/s | model GFLOP/s | matmul peak GFLOP/s (same run) | ratio (MFU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["forward"]:
        lines.append(f"| {r['dtype']} | {len(r['seconds'])} | {r['median_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{common.gflops(r['model_flops_per_s'])} | {common.gflops(r['matmul_peak_flops'])} | "
                     f"{100 * r['mfu']:.0f}% |")
    p = res["peak"]
    lines += ["",
              f"Matmul peak = best of NN and NT layouts, (n, n) @ (n, n): fp32 n={p['fp32']['n']} "
              f"(NN {common.gflops(p['fp32']['flops_NN'])}, NT {common.gflops(p['fp32']['flops_NT'])} GFLOP/s), "
              f"bf16 n={p['bf16']['n']} (NN {common.gflops(p['bf16']['flops_NN'])}, NT "
              f"{common.gflops(p['bf16']['flops_NT'])} GFLOP/s). Model FLOPs: {common.FLOP_FORMULA}.",
              ""]
    if res["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LoadBenchConfig()
    p.add_argument("--quick", action="store_true", help="smoke run: forward at batch 4 x 64, one timed pass")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--budget-s", type=float, default=d.budget_s)
    p.add_argument("--threads", default=d.threads, help="torch threads, or 'auto' (idle cores)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out-dir", default=str(HERE))
    p.add_argument("--child", nargs=2, metavar=("ROLE", "NAME"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(*a.child)

    cfg = LoadBenchConfig(batch_size=a.batch_size, seq_len=a.seq_len, reps=a.reps, budget_s=a.budget_s,
                          threads=a.threads, device=a.device, quick=a.quick)
    if a.quick:
        cfg.batch_size, cfg.reps = 4, 1
    cfg.threads = str(common.set_threads(cfg.threads))
    device = common.pick_device(cfg.device)
    t_start = time.perf_counter()
    machine = common.machine_info(device)
    print("config:", json.dumps(asdict(cfg)), "\nmachine:", json.dumps(machine), flush=True)

    student = load_in_fresh_process("student", cfg.student, cfg.threads)
    print(f"student: load {student['load_s']:.2f} s, peak RSS {student['peak_rss_mb']:.0f} MiB", flush=True)
    teacher = load_in_fresh_process("teacher", cfg.teacher, cfg.threads)
    print(f"teacher: load {teacher['load_s']:.2f} s, peak RSS {teacher['peak_rss_mb']:.0f} MiB", flush=True)

    peak = {"fp32": common.matmul_peak(torch.float32, device), "bf16": common.matmul_peak(torch.bfloat16, device)}
    import models
    gpt, _ = models.load_student(cfg.student)
    clf = models.Classifier(gpt, 2, generator=torch.Generator().manual_seed(cfg.seed)).to(device).eval()
    forward = []
    for bf16 in (False, True):
        r = forward_throughput(clf, cfg, device, bf16, peak["bf16" if bf16 else "fp32"]["peak_flops"])
        print(f"forward {r['dtype']}: {r['tokens_per_s']:.0f} tokens/s, {common.gflops(r['model_flops_per_s'])} "
              f"GFLOP/s, MFU {100 * r['mfu']:.0f}%", flush=True)
        forward.append(r)

    notes = [f"torch threads: {cfg.threads} (auto = usable cores minus the 1-minute load average; on a shared "
             "CPU a larger OpenMP team stalls at every barrier)."]
    if peak["bf16"]["peak_flops"] < 0.5 * peak["fp32"]["peak_flops"]:
        notes.append(f"bf16 is EMULATED on this device (bf16 matmul peak {common.gflops(peak['bf16']['peak_flops'])} "
                     f"vs fp32 {common.gflops(peak['fp32']['peak_flops'])} GFLOP/s): bf16 autocast is slower than "
                     "fp32 here; its MFU is against the bf16 peak.")
    if cfg.quick:
        notes.append(f"QUICK run: forward at batch {cfg.batch_size}, not the issue's 32 × 64.")
    wall = time.perf_counter() - t_start
    notes.append(f"Total wall time {wall:.0f} s. Shared machine: absolute numbers are noisy.")
    res = {"command": " ".join([".venv/bin/python"] + [shlex.quote(x) for x in ["bench/bench_load.py"] + sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine, "config": asdict(cfg),
           "targets": TARGETS, "student_load": student, "teacher_load": teacher, "peak": peak, "forward": forward,
           "flop_formula": common.FLOP_FORMULA, "wall_s": wall, "notes": notes,
           "pass": {"student_load_s": student["load_s"] <= TARGETS["student_load_s"],
                    "student_peak_rss": student["peak_rss_mb"] <= TARGETS["student_peak_rss_mb"],
                    "teacher_load_s": teacher["load_s"] <= TARGETS["teacher_load_s"]}}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json_atomic(out / "results_load.json", res)
    common.write_atomic(out / "RESULTS_load.md", render(res))
    print(render(res))


if __name__ == "__main__":
    main()
