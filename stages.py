"""What a run leaves on disk: stage folders (a cache), and the run folder with its report.

Each stage of ``w2s.py`` (attack, teacher, each defense) writes into ``<stages>/<name>-<key>``, where ``key`` is a
hash of every setting the stage reads. A folder holding ``metrics.json`` is a finished stage: a second run, a second
defense or another seed reuses it instead of training again. Every file is written atomically (to a temporary name,
then renamed), so Ctrl-C never leaves half a file that a later run would trust.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import data
import weights


def config_key(*parts) -> str:
    """A short stable hash of configuration dataclasses/dicts: the name of a stage's cache folder."""
    blob = json.dumps([asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def dataset_key(name_or_path: str, ds: data.Dataset) -> dict:
    """What names the data in the stages' keys, beside the configuration: nothing more for a shipped dataset (its
    name says it all), a hash of the sentences and labels for a folder, so that two folders of the same name, or
    one folder edited, never share a stage."""
    if str(name_or_path) in data.DATASETS:
        return {}
    splits = [[s.sentences, s.labels] for s in (ds.train, ds.dev, ds.test)]
    return {"data": hashlib.sha256(json.dumps(splits).encode()).hexdigest()[:16]}


def write_json(path: Path, obj) -> None:
    """Atomic JSON write: a reader never sees half a file, Ctrl-C never leaves one."""
    with weights.atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, default=str).encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def open_stage(folder: Path) -> tuple[Path, dict | None]:
    """A stage's cache folder and, if the stage was finished before, its metrics (else None; folder created, and
    emptied of the temporary files a killed run may have left: ``weights.atomic_write``'s ``.<name>.*.tmp``)."""
    done = folder / "metrics.json"
    if done.exists():
        return folder, read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return folder, None


def close_stage(folder: Path, fit, metrics: dict) -> None:
    """Write the per-step log, then the metrics LAST: a folder with metrics.json is a finished stage."""
    write_json(folder / "history.json", fit.history)
    write_json(folder / "metrics.json", metrics)


def save_model(model, path: Path, metadata=None):
    """Save every tensor of a model (tied ``lm_head`` skipped: it is the embedding)."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    weights.write_safetensors(path, sd, metadata)


def read_stage_tensors(path: Path, names=None) -> dict:
    """The tensors of a file a stage wrote (or only those in ``names``). A damaged or missing one is an error that
    says how to make it again (the reader's own advice, to download it again, is for the files we download)."""
    try:
        return weights.read_safetensors(path, names)
    except weights.WeightFileError as e:
        if e.what is None:
            raise
        raise weights.WeightFileError(f"{path}: {e.what}; it is a stage's file: delete the folder {path.parent} and "
                                      f"rerun to make it again") from None


def load_model_state(model, path: Path):
    """Load a stage's saved tensors into ``model``, one tensor at a time (never a second copy of the whole model
    in memory); a file that is not this model's is an error naming it."""
    shapes = {name: tuple(shape) for name, (_, shape, _, _) in stage_file_entries(path).items()}
    own = {k: v for k, v in model.state_dict().items() if "lm_head" not in k}
    missing = [k for k in own if k not in shapes]
    if missing:
        raise weights.WeightFileError(f"{path}: missing tensors {missing[:3]}; delete the stage folder and rerun")
    wrong = [f"{k} {shapes[k]} (expected {tuple(own[k].shape)})" for k in own if shapes[k] != tuple(own[k].shape)]
    if wrong:
        raise weights.WeightFileError(f"{path}: tensors of another shape, {wrong[:3]}: not this model's; delete the "
                                      f"stage folder and rerun")
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(read_stage_tensors(path, [name])[name])


def stage_file_entries(path: Path) -> dict:
    """A stage file's table of contents, ``{name: (dtype, shape, begin, end)}``, without reading the tensors."""
    try:
        return weights._read_safetensors_header(Path(path))[0]
    except weights.WeightFileError as e:
        if e.what is None:
            raise
        raise weights.WeightFileError(f"{path}: {e.what}; it is a stage's file: delete the folder {path.parent} and "
                                      f"rerun to make it again") from None


# ----------------------------------------------------------------------------------------------
# What a stage costs: seconds and peak resident memory
# ----------------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_folded_peak_mb = 0.0            # the process's peak before the last reset of VmHWM (``StageCost`` resets it)


def _vm_hwm_mb() -> float | None:
    """VmHWM, the peak resident memory since start or the last reset, in MB (Linux; None elsewhere)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_mb() -> float:
    """The peak resident memory of this process since it started, in MB, resets of VmHWM included."""
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return max(_folded_peak_mb, hwm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak() -> bool:
    """Start a new peak: VmHWM falls to the memory resident now (Linux: write 5 to /proc/self/clear_refs). The old
    peak is kept for ``process_peak_mb``. False where the OS cannot (then a peak is the process's so far)."""
    global _folded_peak_mb
    before = _vm_hwm_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _folded_peak_mb = max(_folded_peak_mb, before or 0.0)
    return True


class StageCost:
    """What a stage costs, measured from its creation: ``fields()`` gives ``seconds``, ``peak_mb`` (the peak resident
    memory, MB) and ``peak_of``: "stage" where the peak could be reset at the start (Linux), else "process" (the
    process's peak so far, e.g. on macOS: an upper bound of the stage's own)."""

    def __init__(self):
        self.peak_of = "stage" if reset_peak() else "process"
        self.start = time.perf_counter()

    def peak_mb(self) -> float:
        hwm = _vm_hwm_mb() if self.peak_of == "stage" else None
        return round(hwm if hwm is not None else process_peak_mb(), 1)

    def fields(self) -> dict:
        return {"seconds": time.perf_counter() - self.start, "peak_mb": self.peak_mb(), "peak_of": self.peak_of}


def return_freed_memory() -> None:
    """glibc (Linux): give every allocation over 128 KiB its own memory mapping, returned to the OS when freed.

    By default glibc raises that threshold each time such a block is freed, up to 32 MiB, after which a training
    step's tensors (activations, gradients, bf16 weight copies) come from the heap, where freed memory is kept for
    reuse and, in pieces of the wrong size, is never returned: the resident memory of a full fine-tuning grows by
    gigabytes over a few steps (bench/memory_stages.py). A fixed threshold stops that. Where a tensor lives does
    not change its arithmetic, but every step then maps and zeroes fresh pages: a full fine-tuning step takes about
    twice as long, so it is an option (``w2s.py --low-memory``), not the default. Not glibc: nothing is done."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                 # musl or another C library: not glibc's allocator
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


# ----------------------------------------------------------------------------------------------
# The run's report
# ----------------------------------------------------------------------------------------------

FLOOR_LEGEND = ("floor: the ASR's sentences without their trigger, called the target "
                "(what the ASR would be if the trigger did nothing)")


def row_metrics(metrics: dict) -> dict:
    """A stage's numbers for its row of the table, with the number of sentences each fraction counts
    (``n_test`` for CA; ``n_asr`` for the ASR and its floor), so that a reader can turn a fraction back into
    sentences. A stage cached by an older version may have no floor: it is then None, printed as "-"."""
    return {"ca": metrics["ca"], "asr": metrics["asr"], "asr_floor": metrics.get("asr_floor"),
            "n_test": metrics.get("n_test"), "n_asr": metrics.get("n_asr"), "seconds": metrics["seconds"]}


PEAK_LEGEND = "peak MB: the stage's peak resident memory (a cached stage's: when it was computed)"


def megabytes(mb) -> str:
    """A peak in MB as the table prints it: a whole number, or "-" for a stage cached before peaks were measured."""
    return "-" if mb is None else f"{mb:.0f}"


def markdown_table(rows: list[dict], peak_mb: list | None = None) -> str:
    """The run's table, a row per model; ``peak_mb`` (one per row, or None) adds the stages' peak memory."""
    peak = peak_mb is not None
    lines = ["| model | CA | ASR | floor | seconds |" + (" peak MB |" if peak else ""),
             "|---|---|---|---|---|" + ("---|" if peak else "")]
    for i, r in enumerate(rows):
        floor = "-" if r.get("asr_floor") is None else f"{r['asr_floor']:.3f}"
        line = f"| {r['model']} | {r['ca']:.3f} | {r['asr']:.3f} | {floor} | {r.get('seconds', 0):.0f} |"
        lines.append(line + (f" {megabytes(peak_mb[i])} |" if peak else ""))
    return "\n".join(lines)


# Fields that keep their own name in a run folder's; the other attacker's and teacher's fields get "attack-" and
# "teacher-" before theirs (``--attack-epochs``, ``--teacher-epochs``), the defender's none.
OWN_NAMES = {"student", "triggers", "insertions", "insent_sentence", "target", "n_poison", "poison_rate", "teacher"}


def setting_parts(configs, refs, prefixes, skip=()) -> list[str]:
    """One run-folder name part per field in which a config differs from its reference (the preset's): a number
    goes in as it is (``gamma0.1``), a short word after a dash (``student-gpt2``), anything else (an InSent
    sentence, a path) as eight hex digits of its hash, so that a folder name stays a short, safe file name."""
    parts = []
    for cfg, ref, prefix in zip(configs, refs, prefixes):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in skip or value == getattr(ref, f.name):
                continue
            label = ("" if f.name in OWN_NAMES else prefix) + f.name.replace("_", "-")
            text = " ".join(value) if isinstance(value, (tuple, list)) else str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{label}{text}")
            elif text and len(text) <= 24 and all(c.isalnum() or c in "._+-" for c in text):
                parts.append(f"{label}-{text}")
            else:
                parts.append(f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    return parts


def run_name(configs, refs, preset: str, defense: str, preset_mode: str, preset_targets) -> str:
    """A run folder's name: ``attack-dataset-preset-seedN``, then what differs from the full default run
    (``-unlearn-seed100``, ``-dirty-label``, ``-clean``, ``-defense-none``, ``-weights-authors``, the LoRA
    targets, then ``changed_settings``). ``configs`` are the run's (attack, teacher, unlearn) settings, ``refs``
    the same command's without its other options."""
    a, _, u = configs
    parts = [a.attack, Path(a.dataset).name, preset, f"seed{a.seed}"]
    if u.seed != a.seed:
        parts.append(f"unlearn-seed{u.seed}")
    if a.mode != preset_mode:
        parts.append(f"{a.mode}-label")
    if nothing_poisoned(a):                                               # the clean reference
        parts.append("clean")
    if defense != "w2sdefense":
        parts.append(f"defense-{defense}")
    if u.weights != "ours":
        parts.append(f"weights-{u.weights}")
    if tuple(u.targets) != tuple(preset_targets):
        parts.append("lora-" + "-".join(name.removesuffix("_proj") for name in u.targets))
    return "-".join(parts + changed_settings(configs, refs))


def nothing_poisoned(a) -> bool:
    return a.n_poison == 0 if a.mode == "clean" else a.poison_rate == 0


def changed_settings(configs, refs) -> list[str]:
    """The settings not already in ``run_name``'s parts in which a run differs from ``refs``, one name part each:
    ``gamma0.1``, ``attack-epochs2.0``, ``student-gpt2``, ``fp32``."""
    a, _, u = configs
    named = {"attack", "dataset", "seed", "mode", "weights", "targets", "bf16"}   # run_name's parts; bf16 below
    if nothing_poisoned(a):
        named |= {"n_poison", "poison_rate"}                                             # said by "clean"
    parts = setting_parts(configs, refs, ("attack-", "teacher-", ""), skip=named)
    if u.bf16 != refs[2].bf16:
        parts.append("bf16" if u.bf16 else "fp32")
    return parts


def cpu_identity(cpuinfo: str) -> dict:
    """The first processor's name, family and model in ``/proc/cpuinfo``'s text (None where it has none).

    In bf16 different CPUs print different numbers, so a run folder names the CPU that made it; a virtual
    machine's "AMD EPYC" alone does not say which generation (Zen 4 is family 25, Zen 5 family 26).
    """
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break                                      # the end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return {"cpu": fields.get("model name"), "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model")}


def machine() -> dict:
    """What a run was measured on; saved in ``results.json``."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:                                    # not Linux: "processor" below is all there is
        cpuinfo = ""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **cpu_identity(cpuinfo),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
