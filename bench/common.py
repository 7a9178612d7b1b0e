"""Helpers shared by the benchmark scripts: machine facts, matmul peak, peak RSS, FLOP counts, atomic writes.

Nothing here is imported by the library; the benchmarks live beside it, not inside it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:                  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Machine and versions
# ----------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on; printed and saved beside every result."""
    flags = cpu_flags()
    info = {
        "cpu": cpu_name(),
        "cpu_cores_visible": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "native_bf16_cpu": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "simd": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    return info


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def set_threads(arg: str) -> int:
    """Set torch's intra-op thread count. ``auto``: the usable cores minus the ones other processes keep
    busy (1-minute load average), at least 1.

    Why: on a shared CPU an OpenMP team larger than the idle cores waits at every barrier for a
    descheduled thread; on the 2-core dev box with one core busy, a forward pass of the student took
    7 s with 2 threads and 0.5 s with 1.
    """
    if arg == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        n = max(1, cores - busy)
    else:
        n = int(arg)
    torch.set_num_threads(n)
    return n


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Matmul peak: the denominator of MFU, measured in the same run as the model
# ----------------------------------------------------------------------------------------------

def time_matmul(a, b, device) -> float:
    sync(device)
    t = time.perf_counter()
    a @ b
    sync(device)
    return time.perf_counter() - t


def matmul_peak(dtype: torch.dtype, device: torch.device, n_max: int = 2048, reps: int = 3,
                target_s: float = 0.5, n_min: int = 1024) -> dict:
    """Best-of-``reps`` FLOP/s of an (n, n) @ (n, n) matmul, in two layouts: ``a @ b`` (NN) and
    ``a @ b.T`` (NT, the layout of ``F.linear``). Some CPU kernels (bf16 without native support) are
    many times faster in one layout than the other, so both are reported and the peak is the better one.

    ``n`` grows from 256 up to ``n_max`` (2048) while one product stays under about ``target_s`` seconds,
    but is at least ``n_min``: on a CPU without native bf16 a 2048^3 product takes tens of seconds.
    """
    g = torch.Generator().manual_seed(0)
    n = 256
    while True:                                       # grow n while a product stays cheap
        a = torch.randn(n, n, generator=g).to(device, dtype)
        dt = time_matmul(a, a, device)
        if n >= n_max or (n >= n_min and dt * 8 > target_s):   # (2n)^3 = 8 n^3
            break
        n *= 2
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = {"n": n, "dtype": str(dtype).replace("torch.", "")}
    for layout, rhs in (("NN", b), ("NT", b.T)):
        time_matmul(a, rhs, device)                  # warm-up
        best = min(time_matmul(a, rhs, device) for _ in range(reps))
        out[f"flops_{layout}"] = 2 * n ** 3 / best
    out["peak_flops"] = max(out["flops_NN"], out["flops_NT"])
    return out


# ----------------------------------------------------------------------------------------------
# Peak resident memory of THIS process
# ----------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident set size (VmRSS), MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since start or since the last ``reset_peak_rss``, MiB.

    VmHWM from /proc (resettable); else ``getrusage`` (peak since start; KiB on Linux, bytes on macOS).
    """
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# FLOP counts (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1)
# ----------------------------------------------------------------------------------------------

def non_embedding_params(gpt) -> int:
    """N: every backbone parameter except the token embedding (a lookup, no FLOPs) and the LM head
    (a classifier never computes it)."""
    skip = {"tok_emb.weight", "lm_head.weight", "pos_emb.weight"}
    return sum(p.numel() for n, p in gpt.named_parameters() if n not in skip)


def forward_flops(n_params: int, n_layer: int, d_attn: int, B: int, T: int) -> float:
    """Forward FLOPs of one (B, T) batch: ``2 N`` per token for the weight matmuls plus
    ``2 n_layer T d_attn`` per token for QK^T and AV (Kaplan's C_forward, no causal halving)."""
    tokens = B * T
    return 2 * n_params * tokens + 2 * n_layer * T * d_attn * tokens


def step_flops(mode: str, n_params: int, n_layer: int, d_attn: int, B: int, T: int) -> float:
    """FLOPs of one step, in units of the forward cost F = 2 N + attention per token:

    * ``infer``: F.
    * ``full``: 3 F, forward + backward (activation grads 2N + weight grads 2N per token, attention x2).
    * ``lora``: 2 F, forward + activation-grad backward: gradients must flow back through every frozen
      weight to reach the lowest LoRA layer (2N per token), but frozen weights get no weight gradient.
      The LoRA matrices' own FLOPs (r = 8) are < 1 % and are left out.
    AdamW and norms are not counted.
    """
    f = forward_flops(n_params, n_layer, d_attn, B, T)
    return {"infer": 1.0, "lora": 2.0, "full": 3.0}[mode] * f


FLOP_FORMULA = ("F = 2*N*tokens + 2*n_layer*T*d_model*tokens (Kaplan 2020, N = non-embedding params, "
                "tokens = B*T incl. padding); inference = F, LoRA step = 2F (backward computes activation "
                "grads through frozen weights, no weight grads), full FT step = 3F; AdamW not counted")


# ----------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def child_result(obj: dict) -> None:
    """A child process reports on one marked line of stdout (anything else it prints is ignored)."""
    print("BENCH_RESULT " + json.dumps(obj), flush=True)


def parse_child(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError("child process printed no BENCH_RESULT line; its output was:\n" + stdout[-3000:])


def gflops(x: float) -> str:
    return f"{x / 1e9:.1f}"
