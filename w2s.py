"""W2SDefense end to end: plant a backdoor, train a small clean teacher, unlearn the backdoor.

    python w2s.py --attack badnet                      # poisoned student, plain-LoRA control, W2SDefense
    python w2s.py --attack insent --defense none       # only plant the backdoor and measure it
    python w2s.py --attack badnet --preset quick       # a first look in a few minutes

Stages (each cached under a hash of its configuration, so a second defense or seed reuses the rest):

1. attack   — poison the training set (clean-label, target 0, as the paper) and fully fine-tune the
              student on it; measure clean accuracy (CA) and attack success rate (ASR).
2. teacher  — fully fine-tune the small clean teacher (encoder + projection to the student's width).
3. unlearn  — wrap the poisoned student in LoRA and train on CLEAN data only, with
              ``alpha*CE + beta*T^2*KL(teacher || student) + gamma*FA`` (W2SDefense), or with CE only
              (the plain-LoRA control, ``--defense lora``), same seed, data and budget.
              ``--defense w2s-origin`` adds an ablation beside both: W2SDefense with the feature term pulling
              toward the origin instead of the teacher's feature (what the teacher's features add).
              ``--defense mix-w2s`` first keeps only a quarter of the attacker's change to every backbone
              weight, ``w_pre + 0.25 (w - w_pre)`` (``MIX_KEEP``), then runs W2SDefense (cpu preset: on the
              whole clean set for one epoch, feature weight 0.02; ``MIX_UNLEARN``), beside the control at that
              budget.
              ``--defense sam-w2s`` runs W2SDefense with sharpness-aware steps (FT-SAM's idea, sam.py: each
              step's gradients taken at weights moved by ``rho = 2`` in ASAM's units, ``SAM_RHO``), beside the
              control and the plain W2SDefense at the same budget.

Checkpoints are chosen on clean dev accuracy only; the test set is read once per model, at the end. Each
model's row gives CA, ASR (triggered test sentences whose true label is not the target, called the target) and
the ASR's floor (the same sentences without the trigger, called the target).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

import torch

import attacks
import data
import lora
import losses
import models
import sam
import train
import weights

# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage, presets as named dicts of overrides
# ----------------------------------------------------------------------------------------------

@dataclass
class AttackConfig:
    """The attacker: how the training set is poisoned and how the student is fine-tuned on it."""
    student: str = weights.DEFAULT_STUDENT
    dataset: str = data.DEFAULT_DATASET
    attack: str = "badnet"
    triggers: tuple = attacks.BADNET_TRIGGERS     # BadNet words, one drawn per insertion
    insertions: int = 1                           # BadNet insertions per sentence
    insent_sentence: str = attacks.INSENT
    target: int = 0
    mode: str = "clean"                           # clean-label (the paper), dirty (non-target rows relabelled) or
                                                  # dirty-any (any rows, as BadNets and HiddenKiller)
    n_poison: int | None = None                   # clean-label: the first n target-label samples; None: the
                                                  # paper's 1000, or all that have a paraphrase if fewer (syntactic)
    poison_rate: float = 0.1                      # dirty-label: share of the training set
    train_size: int | None = None                 # seeded subset of the (poisoned) training set
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 64
    warmup_ratio: float = 0.06
    evals_per_epoch: int = 2
    dev_size: int | None = None                   # seeded subset of the clean dev set for selection
    bf16: bool | None = None                      # None: bf16 autocast where the hardware has bf16 units
    freeze_embeddings: bool = True                # the token table is only looked up: freezing it saves time
    train_layers: int | None = None               # None: every block (full fine-tuning); k: only the top k blocks
    start_token: bool = True                      # the student reads "<start> sentence" (see student_classifier)
    prefix_space: bool = True                     # ... with a space before the first word (see student_classifier)
    seed: int = 0


@dataclass
class TeacherConfig:
    """The defender's small clean teacher: encoder [CLS] -> Linear(d_t, d_s) + ReLU -> Linear(d_s, C)."""
    teacher: str = weights.DEFAULT_TEACHER
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.06
    train_size: int | None = None
    evals_per_epoch: int = 1
    bf16: bool | None = None
    seed: int = 0


PAPER_N_POISON = 1000                             # clean-label poisoned samples in the paper

# The authors' per-attack loss weights (REFERENCE.md §1), kept as a named setting.
AUTHORS_WEIGHTS = {"badnet": (5.0, 0.001, 0.001), "insent": (3.0, 0.01, 0.001), "syntactic": (1.0, 0.035, 0.002)}


@dataclass
class UnlearnConfig:
    """The defender's LoRA fine-tuning on clean data (W2SDefense, or the CE-only control)."""
    alpha: float = 5.0                            # CE weight
    beta: float = 0.001                           # KD weight
    gamma: float = 0.05                           # FA weight (chosen on dev with the held-out trigger cf: RESULTS.md)
    T: float = 2.0
    fa: str = "l2"                                # feature distance: "l2" (the paper's) or "normalized" (directions)
    weights: str = "ours"                         # "ours" (calibrated) or "authors" (per-attack table)
    rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    targets: tuple = ("q_proj", "v_proj")
    lora_layers: int | None = None                # None: LoRA in every block; k: only in the top k blocks
    lr: float = 2e-4
    epochs: float = 2.0
    batch_size: int = 16
    clean_size: int | None = 2000                 # seeded subset of the clean training set
    max_length: int = 64
    evals_per_epoch: int = 1
    bf16: bool | None = None
    seed: int = 0

# HiddenKiller's syntactic attacker (Qi et al. 2021): dirty-label over any rows at its 20 % rate, i.e. all 1,383
# training rows SST-2's SCPN file paraphrases (0.1998 of 6,920), the positives among them relabelled to the target.
# Clean-label, only the 665 paraphrased negatives could carry it (ASR 0.62 after 1 epoch, 0.56 after 3; likely
# because the words of a negative sentence already explain its label); 20 % of the NON-target rows would need
# 1,384 paraphrased positives, and there are 718. (10 % of the non-target rows missed ASR 0.90 on one seed of
# three; RESULTS.md.)
HIDDENKILLER_ATTACK = dict(mode="dirty-any", poison_rate=0.1998)

PRESETS = {
    "quick": {
        # A first look, for notebooks and CI, in under 5 minutes on a 2-core CPU (80-120 s measured, RESULTS.md):
        # small sets, dirty-label poisoning (a clean-label backdoor needs more data than that), short max length,
        # and the attacker trains only the top 6 of the 30 blocks, where the defender's LoRA goes too: the 24
        # blocks below stay the pretrained ones and are run once per sentence (``train.cache_prefix``), exact and
        # 5x cheaper.
        "attack": dict(mode="dirty", poison_rate=0.2, train_size=600, epochs=2.0, lr=2e-4, max_length=32,
                       dev_size=100, evals_per_epoch=1, train_layers=6),
        # the syntactic attack as in cpu, over any rows, before the 600 are drawn
        "attack_for": {"syntactic": HIDDENKILLER_ATTACK},
        "teacher": dict(train_size=600, epochs=2.0, max_length=32),
        "unlearn": dict(clean_size=200, epochs=4.0, lr=3e-3, max_length=32, lora_layers=6, gamma=0.02),
        "eval_size": 200,
    },
    # The default, sized for a laptop CPU: the paper's attacker (clean-label, the first 1,000 negatives get the
    # trigger, full fine-tuning of every block and the embeddings) for one epoch of the full training set; the
    # teacher on the whole clean training set; the defender's LoRA in every block, on a seeded 2,000 clean
    # sentences. Measured times and numbers: RESULTS.md.
    "cpu": {
        "attack": dict(lr=1e-4, freeze_embeddings=False),
        "attack_for": {"syntactic": HIDDENKILLER_ATTACK},
        "teacher": dict(),
        # One set of loss weights for every attack (UnlearnConfig's, chosen once on dev with BadNet `cf`): a
        # defender does not know the trigger, so the defense may not be tuned per attack (RESULTS.md).
        "unlearn": dict(lr=2e-4, rank=512, lora_alpha=512),
        "eval_size": None,
    },
    # The authors' settings, for a GPU (REFERENCE.md §1).
    "paper": {
        "attack": dict(epochs=5.0, lr=2e-5, max_length=128, batch_size=32, freeze_embeddings=False),
        "teacher": dict(epochs=5.0, lr=2e-5, max_length=128, batch_size=32),
        "unlearn": dict(rank=512, lora_alpha=512, epochs=5.0, lr=2e-4, batch_size=32, clean_size=None,
                        max_length=128),
        "eval_size": None,
    },
}

# The unlearning stages each defense runs, in table order: a defense stands beside the plain-LoRA control, and the
# ablation beside what it ablates.
DEFENSE_ROWS = {"none": [], "lora": ["lora"], "w2sdefense": ["lora", "w2sdefense"],
                "w2s-origin": ["lora", "w2sdefense", "w2s-origin"], "mix-w2s": ["lora", "mix-w2s"],
                "sam-w2s": ["lora", "w2sdefense", "sam-w2s"]}
# mix-w2s: Fine-mixing's idea (Zhang et al. 2022, here in WiSE-FT's deterministic form) before W2SDefense. The
# defender also needs the pretrained student's weights (public for an open model; W2SDefense alone does not need
# them). Each backbone weight w of the poisoned student becomes w_pre + MIX_KEEP * (w - w_pre); the head is kept.
# Chosen on the clean dev set with held-out triggers (BadNet `cf`, InSent "we loved that old song"), seeds 3-10:
# bench/calibration/README.md ("Mixing, ..."), in the cpu preset. Its unlearning settings replace the preset's for
# the whole run, the control's too, so that both have the same budget; an option the user gives still wins. (quick
# already has gamma 0.02 and keeps its small budget; paper already unlearns on the whole clean set.)
MIX_KEEP = 0.25
MIX_UNLEARN = {"quick": {}, "cpu": dict(clean_size=None, epochs=1.0, evals_per_epoch=2, gamma=0.02),
               "paper": dict(gamma=0.02)}
# sam-w2s: FT-SAM's idea (Zhu et al. 2023) inside W2SDefense: every step's gradients are taken at the weights the
# unlearning trains through moved by ASAM's adaptive perturbation of radius SAM_RHO (sam.py). Chosen on the clean
# dev set with held-out triggers (BadNet `tq`, InSent "we loved that old song", the syntactic attack with target 1),
# rho 0.5 against 2.0: bench/calibration/README.md ("Sharpness-aware unlearning"). Same budget as W2SDefense, two
# forward and backward passes a step: 1.6 to 1.9 times its time (RESULTS.md).
SAM_RHO = 2.0
DEFENSES = tuple(DEFENSE_ROWS)
POISON_MODES = ("clean", "dirty", "dirty-any")
# The students' projections LoRA can wrap: attention, then the MLP (Llama-style gate/up/down; GPT-2's fc/proj).
LORA_TARGETS = tuple(dict.fromkeys(name for names in models.PROJECTIONS.values() for name in names))


# ----------------------------------------------------------------------------------------------
# Small utilities: devices, stage folders, atomic JSON
# ----------------------------------------------------------------------------------------------

def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> str:
    """``auto`` picks cuda, then mps, then cpu. A device named by hand must exist on this machine: a typo or a GPU
    that this torch cannot see is an error here, before any work, not a traceback at the first tensor moved."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = "no CUDA GPU that this torch can use"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        missing = f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    elif device.type == "mps" and not _mps_available():
        missing = "no Apple GPU (mps) that this torch can use"
    else:
        return name
    raise SystemExit(f"error: --device {name}: this machine has {missing}; use --device auto (here: "
                     f"{pick_device('auto')}) or cpu")


def config_key(*parts) -> str:
    """A short stable hash of configuration dataclasses/dicts: the name of a stage's cache folder."""
    blob = json.dumps([asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    """Atomic JSON write: a reader never sees half a file, Ctrl-C never leaves one."""
    with weights.atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, default=str).encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def open_stage(folder: Path) -> tuple[Path, dict | None]:
    """A stage's cache folder and, if the stage was finished before, its metrics (else None; folder created)."""
    done = folder / "metrics.json"
    if done.exists():
        return folder, read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, None


def close_stage(folder: Path, fit: train.FitResult, metrics: dict) -> None:
    """Write the per-step log, then the metrics LAST: a folder with metrics.json is a finished stage."""
    write_json(folder / "history.json", fit.history)
    write_json(folder / "metrics.json", metrics)


def cpu_identity(cpuinfo: str) -> dict:
    """The first processor's name, family and model in ``/proc/cpuinfo``'s text (None where it has none).

    In bf16 the Intel and AMD machines here print different numbers (RESULTS.md, "Machines and code versions"),
    so a run folder names the CPU that made it; a virtual machine's "AMD EPYC" alone does not say which
    generation (Zen 4 is family 25, Zen 5 family 26). Whether the CPU has bf16 units is not repeated here:
    ``train.native_bf16`` reads that, and each stage's config says which precision ran.
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


def subset_rows(n: int, size: int | None, seed: int, salt: str) -> list[int]:
    """Which of ``n`` rows ``subset`` keeps, in order: a seeded draw of ``size`` (all if None or too large)."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(random.Random(f"{salt}-{seed}").sample(range(n), size))


def subset(split: data.Split, size: int | None, seed: int, salt: str) -> data.Split:
    """A seeded random subset of ``size`` rows (all rows if ``size`` is None or too large)."""
    if size is None or size >= len(split):
        return split
    rows = subset_rows(len(split), size, seed, salt)
    return data.Split([split.sentences[i] for i in rows], [split.labels[i] for i in rows])


# ----------------------------------------------------------------------------------------------
# Stage 1: the attacker plants the backdoor
# ----------------------------------------------------------------------------------------------

def make_triggers(cfg: AttackConfig, data_dir=None):
    """The training trigger and the ASR-test trigger (they differ only for the syntactic attack)."""
    if cfg.attack == "badnet":
        t = attacks.make_trigger("badnet", triggers=tuple(cfg.triggers), count=cfg.insertions)
        return t, t
    if cfg.attack == "insent":
        t = attacks.make_trigger("insent", trigger=cfg.insent_sentence)
        return t, t
    if cfg.attack == "syntactic":
        p = data.load_scpn(cfg.dataset, data_dir)
        return (attacks.make_trigger("syntactic", paraphrases=p.train_paraphrases),
                attacks.make_trigger("syntactic", paraphrases=p.asr_paraphrases(cfg.target)))
    raise ValueError(f"unknown attack {cfg.attack!r}; choose one of {', '.join(attacks.ATTACKS)}")


@dataclass
class Task:
    """Everything the stages share about one dataset + attack: clean splits, the poisoned training set,
    and the evaluation sets (clean test for CA, triggered non-target test for ASR, and the same non-target
    sentences without the trigger for the ASR's floor)."""
    dataset: data.Dataset
    poisoned_train: data.Split
    n_poisoned: int
    dev: data.Split
    test: data.Split
    asr_test: data.Split
    asr_floor: data.Split                           # asr_test's sentences without the trigger, row for row
    data_key: dict = field(default_factory=dict)     # goes into every stage's cache key (``dataset_key``)
    # Where each of asr_floor's rows is in ``test``, when all of them are (the whole test set is read, as in the
    # cpu and paper presets): the floor is then read off the CA pass, not computed in a pass of its own.
    floor_in_test: list[int] | None = None


def dataset_key(name_or_path: str, ds: data.Dataset) -> dict:
    """What names the data in the stages' cache keys, beside the configuration: nothing more for a shipped dataset
    (its name says it all), a hash of the sentences and labels for a folder, so that two folders of the same name,
    or one folder edited, never share a stage."""
    if str(name_or_path) in data.DATASETS:
        return {}
    splits = [[s.sentences, s.labels] for s in (ds.train, ds.dev, ds.test)]
    return {"data": hashlib.sha256(json.dumps(splits).encode()).hexdigest()[:16]}


def build_task(cfg: AttackConfig, eval_size: int | None, data_dir=None) -> Task:
    ds = data.load_dataset(cfg.dataset, data_dir, seed=cfg.seed)
    if not 0 <= cfg.target < ds.num_classes:
        raise data.DataError(f"target label {cfg.target} is not a class of {cfg.dataset} (0..{ds.num_classes - 1})")
    train_trigger, test_trigger = make_triggers(cfg, data_dir)
    rng = random.Random(cfg.seed)
    if cfg.mode == "clean":
        n = cfg.n_poison
        if n is None:       # SST-2 ships SCPN paraphrases for only 665 negative training sentences
            n = min(PAPER_N_POISON, sum(1 for i, y in enumerate(ds.train.labels)
                                        if y == cfg.target and attacks.available(train_trigger, i)))
        poisoned = attacks.poison_clean_label(ds.train, train_trigger, cfg.target, n, rng=rng)
    elif cfg.mode in ("dirty", "dirty-any"):
        pool = "any" if cfg.mode == "dirty-any" else "non-target"
        poisoned = attacks.poison_dirty_label(ds.train, train_trigger, cfg.target, cfg.poison_rate, rng, pool=pool)
    else:
        raise ValueError(f"unknown poisoning mode {cfg.mode!r}; choose {', '.join(POISON_MODES)}")
    train_split = subset(poisoned.as_split(), cfg.train_size, cfg.seed, "attack-train")
    kept = subset(data.Split(poisoned.sentences, [int(p) for p in poisoned.poisoned]), cfg.train_size, cfg.seed,
                  "attack-train")
    # A test sentence without a shipped paraphrase is left out of the ASR set (never counted as clean).
    missing = "skip" if cfg.attack == "syntactic" else "raise"
    rows = attacks.asr_rows(ds.test, test_trigger, cfg.target, missing=missing)
    asr, floor = attacks.asr_pairs_at(ds.test, test_trigger, rows, random.Random(cfg.seed + 1))
    # The same seeded draw from two lists of the same length: the floor set keeps asr's rows, untriggered.
    floor_rows = [rows[j] for j in subset_rows(len(rows), eval_size, 0, "eval-asr")]       # rows of ds.test
    in_test = {r: k for k, r in enumerate(subset_rows(len(ds.test), eval_size, 0, "eval"))}
    floor_in_test = [in_test[r] for r in floor_rows] if all(r in in_test for r in floor_rows) else None
    return Task(ds, train_split, sum(kept.labels), subset(ds.dev, cfg.dev_size, cfg.seed, "dev"),
                subset(ds.test, eval_size, 0, "eval"), subset(asr, eval_size, 0, "eval-asr"),
                subset(floor, eval_size, 0, "eval-asr"), dataset_key(cfg.dataset, ds), floor_in_test)


def student_classifier(cfg_student: str, num_classes: int, seed: int, start_token: bool = True,
                       prefix_space: bool = True):
    """The pretrained student with a fresh, seeded classification head, and its tokenizer set to read a
    sentence the way a Llama tokenizer (the paper's students) would:

    * ``start_token``: ``<start> sentence``, with the model's BOS token (SmolLM2: ``<|im_start|>``; GPT-2,
      which has none: ``<|endoftext|>``). A causal LM dumps much of its attention on whatever token comes
      first (an "attention sink", Xiao et al. 2023, arXiv 2309.17453); better a start token than a word.
    * ``prefix_space``: ``" " + sentence``, so the first word is the same token(s) as anywhere else. Without
      it, a BadNet ``mn`` inserted as the FIRST word is another token (``"mn"``, not ``" m" "n"``), which the
      clean-label attack barely learns: such test sentences fired the backdoor 6 % of the time, against
      99.8-100 % for the trigger anywhere else (SmolLM2-135M, cpu preset, seed 0; RESULTS.md).
    """
    backbone, tokenizer = models.load_student(cfg_student)
    tokenizer.add_prefix_space = prefix_space
    if start_token:
        tokenizer.bos_id = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
        tokenizer.add_bos = True
    clf = models.Classifier(backbone, num_classes, generator=torch.Generator().manual_seed(seed))
    return clf, tokenizer


def save_model(model, path: Path, metadata=None):
    """Save every tensor of a model (tied ``lm_head`` skipped: it is the embedding)."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    weights.write_safetensors(path, sd, metadata)


def read_stage_tensors(path: Path) -> dict:
    """The tensors of a file a stage wrote. A damaged or missing one is an error that says how to make it again
    (the reader's own advice, to download it again, is for the files we download)."""
    try:
        return weights.read_safetensors(path)
    except weights.WeightFileError as e:
        if e.what is None:
            raise
        raise weights.WeightFileError(f"{path}: {e.what}; it is a stage's file: delete the folder {path.parent} and "
                                      f"rerun to make it again") from None


def load_model_state(model, path: Path):
    """Load a stage's saved tensors into ``model``; a file that is not this model's is an error naming it."""
    sd = read_stage_tensors(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and "lm_head" not in k]
    if missing:
        raise weights.WeightFileError(f"{path}: missing tensors {missing[:3]}; delete the stage folder and rerun")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if wrong:
        raise weights.WeightFileError(f"{path}: tensors of another shape, {wrong[:3]}: not this model's; delete the "
                                      f"stage folder and rerun")
    model.load_state_dict(sd, strict=False)


def frozen_blocks(model, top: int | None) -> int:
    """How many bottom blocks stay frozen when only the ``top`` blocks are trained (0 when ``top`` is None)."""
    if top is None:
        return 0
    if top < 1:
        raise ValueError(f"the number of trained top blocks must be at least 1, got {top}")
    return max(0, len(model.backbone.blocks) - top)              # top >= the depth: every block


# Frozen-prefix states already computed in this process, shared by the stages: the bottom blocks that the
# attacker did not train are the pretrained student's, and the defender's LoRA stays above them too.
PREFIX_MEMO: dict = {}


def encode_for(model, tokenizer, split: data.Split, max_length: int, frozen: int, device, memo_key=None,
               bf16: bool = False) -> train.Encoded:
    """Token ids of ``split``, plus the frozen-prefix cache when the bottom ``frozen`` blocks are frozen
    (``memo_key`` names whose bottom blocks they are: states are shared between models with the same key)."""
    enc = train.encode(tokenizer, split.sentences, split.labels, max_length)
    memo = PREFIX_MEMO if memo_key is not None else None
    return train.cache_prefix(model, enc, frozen, device, memo=memo, memo_key=memo_key, bf16=bf16)


def evaluate(model, tokenizer, task: Task, target: int, max_length: int, device, bf16: bool, frozen: int = 0,
             memo_key=None) -> dict:
    """CA on the clean test set, ASR on the triggered non-target test set, and the ASR's floor (the same
    non-target sentences without the trigger, called the target); read once per model.

    When the floor's sentences are all in the clean test set (``task.floor_in_test``), their answers are the
    CA pass's own, so the floor and the confusion matrix count the same answers; otherwise (a subset of the
    test set) they get a pass of their own."""
    clean = encode_for(model, tokenizer, task.test, max_length, frozen, device, memo_key, bf16)
    trig = encode_for(model, tokenizer, task.asr_test, max_length, frozen, device, memo_key, bf16)
    p_clean = train.predict(model, clean, device=device, bf16=bf16)
    p_trig = train.predict(model, trig, device=device, bf16=bf16)
    if task.floor_in_test is not None:
        rows = torch.tensor(task.floor_in_test, dtype=torch.long)
        p_untrig, y_untrig = p_clean[rows], clean.labels[rows]
    else:
        untrig = encode_for(model, tokenizer, task.asr_floor, max_length, frozen, device, memo_key, bf16)
        p_untrig, y_untrig = train.predict(model, untrig, device=device, bf16=bf16), untrig.labels
    return {"ca": train.accuracy(p_clean, clean.labels),
            "asr": train.attack_success_rate(p_trig, trig.labels, target),
            "asr_floor": train.attack_success_rate(p_untrig, y_untrig, target),
            "confusion": train.confusion_matrix(p_clean, clean.labels, task.dataset.num_classes),
            "n_test": len(clean), "n_asr": len(trig)}


def fit_config(cfg, **over) -> train.FitConfig:
    names = {f.name for f in dataclasses.fields(train.FitConfig)}
    return train.FitConfig(**{k: v for k, v in asdict(cfg).items() if k in names}, **over)


def attack_stage(cfg: AttackConfig, task: Task, stages: Path, device: str) -> tuple[Path, dict]:
    """Poison and fully fine-tune the student; cached in ``stages/attack-<key>``."""
    folder, done = open_stage(stages / f"attack-{config_key(cfg, {'eval': len(task.test), **task.data_key})}")
    if done is not None:
        return folder, done
    start = time.perf_counter()
    model, tokenizer = student_classifier(cfg.student, task.dataset.num_classes, cfg.seed, cfg.start_token,
                                          cfg.prefix_space)
    frozen = frozen_blocks(model, cfg.train_layers)
    if cfg.freeze_embeddings or frozen:
        model.backbone.tok_emb.weight.requires_grad_(False)
    for block in model.backbone.blocks[:frozen]:          # train_layers = k: only the top k blocks learn
        block.requires_grad_(False)
    model.to(device)
    # The frozen bottom blocks are the pretrained student's: their states can be shared with later stages.
    memo_key = ("pretrained", cfg.student)
    train_data = encode_for(model, tokenizer, task.poisoned_train, cfg.max_length, frozen, device, memo_key, cfg.bf16)
    dev_data = encode_for(model, tokenizer, task.dev, cfg.max_length, frozen, device, memo_key, cfg.bf16)
    desc = "attack: full fine-tune" if not frozen else f"attack: fine-tune the top {cfg.train_layers} blocks"
    fit = train.fit(model, train_data, dev_data, fit_config(cfg), device=device, desc=desc)
    metrics = evaluate(model, tokenizer, task, cfg.target, cfg.max_length, device, cfg.bf16, frozen, memo_key)
    save_model(model, folder / "student.safetensors")
    metrics.update(best_dev_acc=fit.best_dev_acc, best_step=fit.best_step, steps=fit.steps,
                   n_train=len(train_data), n_poisoned=task.n_poisoned, dev_history=fit.dev_history,
                   feature_dim=model.feature_dim,
                   seconds=time.perf_counter() - start)
    close_stage(folder, fit, metrics)
    return folder, metrics


def load_poisoned(cfg: AttackConfig, folder: Path, num_classes: int):
    model, tokenizer = student_classifier(cfg.student, num_classes, cfg.seed, cfg.start_token, cfg.prefix_space)
    load_model_state(model, folder / "student.safetensors")
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Stage 2: the defender's clean teacher
# ----------------------------------------------------------------------------------------------

def teacher_classifier(cfg: TeacherConfig, num_classes: int, d_student: int):
    encoder, tokenizer = models.load_teacher(cfg.teacher)
    clf = models.Classifier(encoder, num_classes, proj_dim=d_student,
                            generator=torch.Generator().manual_seed(cfg.seed))
    return clf, tokenizer


def teacher_stage(cfg: TeacherConfig, task: Task, d_student: int, stages: Path, device: str) -> tuple[Path, dict]:
    """Fully fine-tune the teacher on the CLEAN training set; cached in ``stages/teacher-<key>``."""
    key = config_key(cfg, {'dataset': task.dataset.name, 'd_student': d_student, 'eval': len(task.test),
                           **task.data_key})
    folder, done = open_stage(stages / f"teacher-{key}")
    if done is not None:
        return folder, done
    start = time.perf_counter()
    model, tokenizer = teacher_classifier(cfg, task.dataset.num_classes, d_student)
    model.to(device)
    clean = subset(task.dataset.train, cfg.train_size, cfg.seed, "teacher-train")
    train_data = train.encode(tokenizer, clean.sentences, clean.labels, cfg.max_length)
    dev_data = train.encode(tokenizer, task.dev.sentences, task.dev.labels, cfg.max_length)
    fit = train.fit(model, train_data, dev_data, fit_config(cfg), device=device, desc="teacher: full fine-tune")
    test = train.encode(tokenizer, task.test.sentences, task.test.labels, cfg.max_length)
    metrics = {"ca": train.accuracy(train.predict(model, test, device=device), test.labels),
               "best_dev_acc": fit.best_dev_acc, "n_train": len(train_data),
               "seconds": time.perf_counter() - start}
    save_model(model, folder / "teacher.safetensors")
    close_stage(folder, fit, metrics)
    return folder, metrics


@torch.inference_mode()
def teacher_outputs(cfg: TeacherConfig, folder: Path, sentences, num_classes: int, d_student: int,
                    max_length: int, device: str):
    """The frozen teacher's logits ``z_t`` (N, C) and features ``h_t`` (N, d_s), computed once and cached."""
    key = hashlib.sha256(json.dumps([sentences, max_length]).encode()).hexdigest()[:12]
    path = folder / f"outputs-{key}.safetensors"
    if path.exists():
        t = read_stage_tensors(path)
        return t["z_t"], t["h_t"]
    model, tokenizer = teacher_classifier(cfg, num_classes, d_student)
    load_model_state(model, folder / "teacher.safetensors")
    model.to(device).eval()
    enc = train.encode(tokenizer, sentences, [0] * len(sentences), max_length)
    z_t, h_t = torch.empty(len(enc), num_classes), torch.empty(len(enc), d_student)
    for b in train.batches(enc, 64):
        z, h = model(b.input_ids.to(device), b.attention_mask.to(device), return_features=True)
        z_t[b.index], h_t[b.index] = z.float().cpu(), h.float().cpu()
    weights.write_safetensors(path, {"z_t": z_t, "h_t": h_t})
    return z_t, h_t


# ----------------------------------------------------------------------------------------------
# Stage 3: unlearning with LoRA on clean data
# ----------------------------------------------------------------------------------------------

def resolve_weights(cfg: UnlearnConfig, attack: str, defense: str) -> tuple[float, float, float]:
    """(alpha, beta, gamma): W2SDefense's, ours or the authors' per-attack table; the control is the same run
    with beta = gamma = 0, so it keeps W2SDefense's alpha (which matters: the gradient is clipped, and the
    authors' alpha is 3 for InSent and 1 for the syntactic attack)."""
    alpha, beta, gamma = AUTHORS_WEIGHTS[attack] if cfg.weights == "authors" else (cfg.alpha, cfg.beta, cfg.gamma)
    if defense == "lora":
        return alpha, 0.0, 0.0
    return alpha, beta, gamma


def fa_distance(cfg: UnlearnConfig) -> str:
    """The feature distance: ours (``cfg.fa``), or the paper's plain L2 with the authors' weights."""
    return "l2" if cfg.weights == "authors" else cfg.fa


def feature_target(defense: str, h_t: torch.Tensor) -> torch.Tensor:
    """What the feature term pulls each clean sentence's pooled feature toward: W2SDefense, its teacher feature
    ``h_t[i]``; the ablation ``w2s-origin``, the origin, so that ``FA = 1/B * sum_i ||h_s[i]||^2`` asks only for
    a smaller feature. (The teacher's logits still feed the KL term.) What the difference does to CA and ASR is
    measured, on dev and on the reported rows, in RESULTS.md ("toward the origin")."""
    return torch.zeros_like(h_t) if defense == "w2s-origin" else h_t


def unlearning_loss(alpha, beta, gamma, T, z_t_all=None, h_t_all=None, fa: str = "l2"):
    """The ``loss_fn`` of ``train.fit`` for unlearning. With the cached teacher outputs (looked up by row):
    ``alpha*CE + beta*KD + gamma*FA``; without them (the control): ``alpha*CE`` alone."""
    def loss_fn(model, batch):
        z_s, h_s = model(**batch.inputs(), return_features=True)
        if z_t_all is None:
            ce = losses.cross_entropy(z_s, batch.labels)
            return alpha * ce, {"ce": ce.item()}
        idx = batch.index.cpu()
        z_t, h_t = z_t_all[idx].to(z_s.device), h_t_all[idx].to(z_s.device)
        return losses.w2s_loss(z_s, h_s, batch.labels, z_t, h_t, alpha, beta, gamma, T, fa)
    return loss_fn


def add_lora(model, cfg: UnlearnConfig) -> int:
    """LoRA on the projections named by ``cfg.targets`` (the preset: attention query and value) of the top
    ``cfg.lora_layers`` blocks, or of all; the classification head stays fully trainable. Returns how many bottom
    blocks stay frozen."""
    frozen = frozen_blocks(model, cfg.lora_layers)
    present = {name.rsplit(".", 1)[-1] for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [name for name in cfg.targets if name not in present]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not projections of this student; it has {sorted(present)}")
    lora.inject_lora(model, targets=tuple(cfg.targets), r=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     generator=torch.Generator().manual_seed(cfg.seed), trainable=("head",),
                     within=[f"backbone.blocks.{i}." for i in range(frozen, len(model.backbone.blocks))])
    return frozen


def interpolate_weights(module: torch.nn.Module, reference: torch.nn.Module, keep: float) -> None:
    """In place, every parameter ``w`` of ``module`` becomes ``w_ref + keep * (w - w_ref)``, ``w_ref`` the parameter
    of the same name in ``reference`` (same architecture): ``keep`` 1 leaves ``module`` as it is, 0 makes it
    ``reference``."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {keep}")
    ref = dict(reference.named_parameters())
    ours = dict(module.named_parameters())
    if ref.keys() != ours.keys() or any(ref[n].shape != p.shape for n, p in ours.items()):
        raise ValueError("interpolate_weights needs two modules of the same architecture")
    with torch.no_grad():
        for name, w in ours.items():
            w.copy_(keep * w + (1.0 - keep) * ref[name].to(w))            # the same, exact at both ends


def mix_with_pretrained(model, acfg: AttackConfig) -> None:
    """mix-w2s's first step: the poisoned backbone moved back toward the pretrained student's, in place."""
    interpolate_weights(model.backbone, models.load_student(acfg.student)[0], MIX_KEEP)


def prefix_owner(model, frozen: int, acfg: AttackConfig, attack_folder: Path, defense: str = "w2sdefense") -> tuple:
    """Whose bottom ``frozen`` blocks these are, to share cached prefix states: below the blocks the attacker
    trained, the poisoned student is still the pretrained one; mixed blocks are nobody else's."""
    if defense == "mix-w2s":
        return ("mixed", str(attack_folder), MIX_KEEP)
    if frozen <= frozen_blocks(model, acfg.train_layers):
        return ("pretrained", acfg.student)
    return ("poisoned", str(attack_folder))


def load_unlearned(cfg: UnlearnConfig, acfg: AttackConfig, attack_folder: Path, folder: Path, num_classes: int,
                   defense: str = "w2sdefense"):
    """The poisoned student (mixed first for ``mix-w2s``) with the LoRA (and head) saved by the unlearning stage of
    ``defense`` in ``folder``."""
    model, tokenizer = load_poisoned(acfg, attack_folder, num_classes)
    if defense == "mix-w2s":
        mix_with_pretrained(model, acfg)
    add_lora(model, cfg)
    lora.load_lora_state_dict(model, read_stage_tensors(folder / "lora.safetensors"))
    return model.eval(), tokenizer


def unlearn_stage(defense: str, cfg: UnlearnConfig, acfg: AttackConfig, attack_folder: Path, tcfg: TeacherConfig,
                  teacher_folder: Path | None, task: Task, stages: Path, device: str) -> tuple[Path, dict]:
    """LoRA fine-tuning of the poisoned student on clean data; cached in ``stages/<defense>-<key>``."""
    a, b, g = resolve_weights(cfg, acfg.attack, defense)
    # The control does not read the W2S weights or the teacher: leave them out of its key, so changing them
    # reuses the control.
    key_cfg = dataclasses.replace(cfg, alpha=a, beta=0.0, gamma=0.0, fa="", weights="") if defense == "lora" else cfg
    key = config_key(key_cfg, acfg, tcfg if defense != "lora" else None,
                     {"defense": defense, "eval": len(task.test), **task.data_key},
                     *([{"mix": MIX_KEEP}] if defense == "mix-w2s" else []),
                     *([{"sam": SAM_RHO}] if defense == "sam-w2s" else []))
    folder, done = open_stage(stages / f"{defense}-{key}")
    if done is not None:
        return folder, done
    start = time.perf_counter()
    model, tokenizer = load_poisoned(acfg, attack_folder, task.dataset.num_classes)
    if defense == "mix-w2s":
        mix_with_pretrained(model, acfg)
    # LoRA on cfg.targets (the preset: query and value); the classification head stays fully trainable.
    frozen = add_lora(model, cfg)
    model.to(device)
    clean = subset(task.dataset.train, cfg.clean_size, cfg.seed, "defender-clean")
    memo_key = prefix_owner(model, frozen, acfg, attack_folder, defense)
    train_data = encode_for(model, tokenizer, clean, cfg.max_length, frozen, device, memo_key, cfg.bf16)
    dev_data = encode_for(model, tokenizer, task.dev, cfg.max_length, frozen, device, memo_key, cfg.bf16)
    if defense == "lora":
        loss_fn = unlearning_loss(a, 0.0, 0.0, cfg.T)
    else:
        z_t, h_t = teacher_outputs(tcfg, teacher_folder, clean.sentences, task.dataset.num_classes,
                                   model.feature_dim, cfg.max_length, device)
        h_t = feature_target(defense, h_t)
        loss_fn = unlearning_loss(a, b, g, cfg.T, z_t, h_t, fa_distance(cfg))
        if defense == "sam-w2s":
            loss_fn = sam.sharpness_aware(loss_fn, SAM_RHO)
    fit = train.fit(model, train_data, dev_data, fit_config(cfg, warmup_ratio=0.0), loss_fn=loss_fn,
                    device=device, desc=f"unlearn: {defense}")
    # Read at the attacker's max length, as the poisoned student's row was: every row of the table reads the same
    # test sentences the same way, whatever length the defender trained at.
    metrics = evaluate(model, tokenizer, task, acfg.target, acfg.max_length, device, cfg.bf16, frozen, memo_key)
    metrics.update(best_dev_acc=fit.best_dev_acc, best_step=fit.best_step, steps=fit.steps,
                   dev_history=fit.dev_history,
                   weights={"alpha": a, "beta": b, "gamma": g, "T": cfg.T, "fa": fa_distance(cfg),
                            **({"mix": MIX_KEEP} if defense == "mix-w2s" else {}),
                            **({"sam": SAM_RHO} if defense == "sam-w2s" else {})},
                   trainable=lora.count_trainable(model), seconds=time.perf_counter() - start)
    lora.save_lora(model, folder / "lora.safetensors")
    close_stage(folder, fit, metrics)
    return folder, metrics


# ----------------------------------------------------------------------------------------------
# The pipeline and its report
# ----------------------------------------------------------------------------------------------

def preset_attack(preset: str, attack: str) -> AttackConfig:
    """The attacker's settings of a preset, with its per-attack overrides (``attack_for``)."""
    p = PRESETS[preset]
    return AttackConfig(**{**p["attack"], **p.get("attack_for", {}).get(attack, {})})


def resolve_configs(args) -> tuple[AttackConfig, TeacherConfig, UnlearnConfig, int | None]:
    """Preset first, then every option the user gave explicitly."""
    p = PRESETS[args.preset]
    a = preset_attack(args.preset, args.attack)
    t = TeacherConfig(**p["teacher"])
    u = UnlearnConfig(**p["unlearn"])
    if getattr(args, "defense", None) == "mix-w2s":
        u = dataclasses.replace(u, **MIX_UNLEARN[args.preset])
    common = dict(seed=args.seed)
    a = dataclasses.replace(a, **common, **_given(args, {
        "student": "student", "dataset": "dataset", "attack": "attack", "target": "target", "mode": "poison_mode",
        "n_poison": "n_poison", "poison_rate": "poison_rate", "epochs": "attack_epochs", "lr": "attack_lr",
        "insertions": "insertions", "insent_sentence": "insent_sentence", "train_layers": "attack_layers"}))
    if args.triggers is not None:
        a = dataclasses.replace(a, triggers=tuple(args.triggers.split()))
    t = dataclasses.replace(t, **common, **_given(args, {"teacher": "teacher", "epochs": "teacher_epochs"}))
    # bf16 autocast pays off only with bf16 hardware (a GPU, or a CPU with AVX-512 BF16 / AMX); elsewhere it is
    # emulated and several times slower than float32.
    bf16 = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    if bf16 is None:
        bf16 = train.native_bf16(pick_device(args.device))
    a, t, u = (c if c.bf16 is not None else dataclasses.replace(c, bf16=bf16) for c in (a, t, u))
    u = dataclasses.replace(u, seed=args.seed if args.unlearn_seed is None else args.unlearn_seed, **_given(args, {
        "alpha": "alpha", "beta": "beta", "gamma": "gamma", "rank": "rank", "lora_alpha": "lora_alpha",
        "epochs": "epochs", "lr": "lr", "clean_size": "clean_size", "weights": "weights", "lora_layers": "lora_layers",
        "fa": "fa"}))
    if args.lora_targets is not None:
        u = dataclasses.replace(u, targets=tuple(args.lora_targets.split()))
    given = [f"--{o}" for o in ("alpha", "beta", "gamma", "fa") if getattr(args, o) is not None]
    if u.weights == "authors" and given:
        raise SystemExit(f"error: --weights authors sets alpha, beta, gamma and the feature distance from the authors' "
                         f"table; drop {' '.join(given)} or use --weights ours")
    if a.mode == "clean" and args.poison_rate is not None:
        raise SystemExit("error: --poison-rate is for the dirty-label modes; clean-label poisoning takes --n-poison")
    if a.mode != "clean" and args.n_poison is not None:
        raise SystemExit(f"error: --n-poison is for clean-label poisoning; {a.mode} takes --poison-rate")
    return a, t, u, p["eval_size"]


def _given(args, mapping: dict) -> dict:
    return {field_: getattr(args, opt) for field_, opt in mapping.items() if getattr(args, opt) is not None}


def check_configs(a: AttackConfig, t: TeacherConfig, u: UnlearnConfig, defense: str, data_dir) -> None:
    """Fail before any training on a combination that cannot work."""
    if a.attack not in attacks.ATTACKS:
        raise SystemExit(f"error: unknown attack {a.attack!r}; choose one of {', '.join(attacks.ATTACKS)}")
    if defense not in DEFENSES:
        raise SystemExit(f"error: unknown defense {defense!r}; choose one of {', '.join(DEFENSES)}")
    if a.attack == "syntactic" and a.dataset not in data.SCPN:
        raise SystemExit(f"error: the syntactic attack needs precomputed paraphrases, shipped only for "
                         f"{', '.join(data.SCPN)}; dataset {a.dataset!r} has none")
    if a.dataset not in data.DATASETS and not Path(a.dataset).is_dir():
        raise SystemExit(f"error: unknown dataset {a.dataset!r}; choose one of {', '.join(data.DATASETS)} "
                         f"or give a folder with train.tsv, dev.tsv, test.tsv")
    for name, value in (("--rank", u.rank), ("--lora-alpha", u.lora_alpha), ("--epochs", u.epochs),
                        ("--attack-epochs", a.epochs), ("--teacher-epochs", t.epochs), ("--lr", u.lr),
                        ("--attack-lr", a.lr), ("--insertions", a.insertions)):
        if value <= 0:
            raise SystemExit(f"error: {name} must be positive, got {value}")
    if u.clean_size is not None and u.clean_size < 1:
        raise SystemExit(f"error: --clean-size must be at least 1, got {u.clean_size}")
    if not 0.0 <= a.poison_rate <= 1.0:
        raise SystemExit(f"error: --poison-rate is a share of the training set, in [0, 1]; got {a.poison_rate}")
    spec = data.DATASETS.get(a.dataset)
    if a.target < 0 or (spec is not None and a.target >= spec.num_classes):
        classes = f"0..{spec.num_classes - 1}" if spec is not None else "0 or more"
        raise SystemExit(f"error: --target {a.target} is not a class of {a.dataset} ({classes})")
    for name, value in (("--alpha", u.alpha), ("--beta", u.beta), ("--gamma", u.gamma)):
        if value < 0:
            raise SystemExit(f"error: {name} must be >= 0, got {value}")
    for name, value in (("--attack-layers", a.train_layers), ("--lora-layers", u.lora_layers),
                        ("--n-poison", a.n_poison)):
        if value is not None and value < (0 if name == "--n-poison" else 1):
            raise SystemExit(f"error: {name} must be {'>= 0' if name == '--n-poison' else 'at least 1'}, got {value}")
    unknown = [name for name in u.targets if name not in LORA_TARGETS]
    if unknown or not u.targets:
        raise SystemExit(f"error: --lora-targets {' '.join(u.targets)!r}: choose among {', '.join(LORA_TARGETS)}")
    if defense == "w2s-origin" and fa_distance(u) != "l2":
        raise SystemExit("error: --defense w2s-origin pulls the feature toward the origin, which has no direction; "
                         "it needs the L2 feature distance (--fa l2)")
    if u.weights not in ("ours", "authors"):
        raise SystemExit(f"error: --weights must be 'ours' or 'authors', got {u.weights!r}")
    for name, value in (("--seed", a.seed), ("--unlearn-seed", u.seed)):
        if value < 0:                                   # a run folder "...-seed-1" would read as seed 1
            raise SystemExit(f"error: {name} must be >= 0, got {value}")
    if not a.triggers:
        raise SystemExit("error: --triggers needs at least one word")
    if not a.insent_sentence.strip():
        raise SystemExit("error: --insent-sentence is empty; give the sentence the InSent attack inserts")
    try:
        check_student(a, u)
        check_teacher(t, defense)
    except weights.UnknownModelError as e:
        raise SystemExit(f"error: {e}") from None


def check_student(a: AttackConfig, u: UnlearnConfig) -> None:
    """One of ``check_configs``'s last two, which read model files: that the student has the projections LoRA is
    asked to wrap. Reads the metadata only (seconds), so that a wrong ``--lora-targets`` fails before the attack
    trains (in ``w2s.py`` and the bench scripts alike), not at the first unlearning stage a quarter of an hour later."""
    style = models.decoder_style(weights.resolve_student(a.student))
    if style is None:
        return
    missing = [name for name in u.targets if name not in models.PROJECTIONS[style]]
    if missing:
        raise SystemExit(f"error: --lora-targets {' '.join(missing)}: not projections of {a.student} "
                         f"({style} blocks have {', '.join(models.PROJECTIONS[style])})")


def check_teacher(t: TeacherConfig, defense: str) -> None:
    """That the teacher a defense needs is a known name or a model folder, with its files here (or fetched now):
    otherwise a wrong ``--teacher`` would fail only after the attack has trained. The control alone needs none."""
    if any(row != "lora" for row in DEFENSE_ROWS[defense]):
        weights.resolve_teacher(t.teacher)


def row_metrics(metrics: dict) -> dict:
    """A stage's numbers for its row of the table, with the number of sentences each fraction counts
    (``n_test`` for CA; ``n_asr`` for the ASR and its floor), so that a reader can turn a fraction back into
    sentences. A stage cached before the ASR's floor was measured (2026-12-05) has none: its floor is None,
    printed as "-"."""
    return {"ca": metrics["ca"], "asr": metrics["asr"], "asr_floor": metrics.get("asr_floor"),
            "n_test": metrics.get("n_test"), "n_asr": metrics.get("n_asr"), "seconds": metrics["seconds"]}


FLOOR_LEGEND = ("floor: the ASR's sentences without their trigger, called the target "
                "(what the ASR would be if the trigger did nothing)")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | CA | ASR | floor | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        floor = "-" if r.get("asr_floor") is None else f"{r['asr_floor']:.3f}"
        lines.append(f"| {r['model']} | {r['ca']:.3f} | {r['asr']:.3f} | {floor} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def run_name(args, a: AttackConfig, t: TeacherConfig, u: UnlearnConfig) -> str:
    """The default run folder's name, e.g. ``badnet-sst2-cpu-seed0``: what differs from the full default run is
    added to it (``-unlearn-seed100``, ``-dirty-label``, ``-clean``, ``-defense-none``, ``-weights-authors``, then
    every other setting that differs from the preset's, ``changed_settings``), so that one run never overwrites
    another's table."""
    preset, defense = args.preset, args.defense
    parts = [a.attack, Path(a.dataset).name, preset, f"seed{a.seed}"]
    if u.seed != a.seed:
        parts.append(f"unlearn-seed{u.seed}")
    if a.mode != preset_attack(preset, a.attack).mode:
        parts.append(f"{a.mode}-label")
    if nothing_poisoned(a):                                               # the clean reference
        parts.append("clean")
    if defense != "w2sdefense":
        parts.append(f"defense-{defense}")
    if u.weights != "ours":
        parts.append(f"weights-{u.weights}")
    if tuple(u.targets) != tuple(PRESETS[preset]["unlearn"].get("targets", UnlearnConfig.targets)):
        parts.append("lora-" + "-".join(name.removesuffix("_proj") for name in u.targets))
    return "-".join(parts + changed_settings(args, a, t, u))


def nothing_poisoned(a: AttackConfig) -> bool:
    return a.n_poison == 0 if a.mode == "clean" else a.poison_rate == 0


# Fields that keep their own name in a run folder's; the other attacker's and teacher's fields get "attack-" and
# "teacher-" before theirs (``--attack-epochs``, ``--teacher-epochs``), the defender's none.
OWN_NAMES = {"student", "triggers", "insertions", "insent_sentence", "target", "n_poison", "poison_rate", "teacher"}


def changed_settings(args, a: AttackConfig, t: TeacherConfig, u: UnlearnConfig) -> list[str]:
    """The settings not already in ``run_name``'s parts in which this run differs from the same command without its
    other options, one name part each: ``gamma0.1``, ``attack-epochs2.0``, ``student-gpt2``, ``fp32``. A value that
    is not a short word or number goes in as eight hex digits of its hash (an InSent sentence, a path)."""
    plain = parser().parse_args(["--attack", a.attack, "--dataset", a.dataset, "--preset", args.preset,
                                 "--defense", args.defense, "--seed", str(a.seed), "--unlearn-seed", str(u.seed),
                                 "--device", args.device, "--poison-mode", a.mode, "--weights", u.weights,
                                 "--lora-targets", " ".join(u.targets)])
    refs = resolve_configs(plain)[:3]
    named = {"attack", "dataset", "seed", "mode", "weights", "targets", "bf16"}   # run_name's parts; bf16 below
    if nothing_poisoned(a):
        named |= {"n_poison", "poison_rate"}                                             # said by "clean"
    parts = []
    for cfg, ref, prefix in zip((a, t, u), refs, ("attack-", "teacher-", "")):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in named or value == getattr(ref, f.name):
                continue
            label = ("" if f.name in OWN_NAMES else prefix) + f.name.replace("_", "-")
            text = " ".join(value) if isinstance(value, (tuple, list)) else str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{label}{text}")
            elif text and len(text) <= 24 and all(c.isalnum() or c in "._+-" for c in text):
                parts.append(f"{label}-{text}")
            else:
                parts.append(f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    if u.bf16 != refs[2].bf16:
        parts.append("bf16" if u.bf16 else "fp32")
    return parts


def run(args) -> dict:
    a, t, u, eval_size = resolve_configs(args)
    check_configs(a, t, u, args.defense, args.data_dir)
    device = pick_device(args.device)
    stages = Path(args.stages)
    out = Path(args.out or Path("runs") / run_name(args, a, t, u))
    for flag, folder in (("--stages", stages), ("--out", out)):
        if folder.exists() and not folder.is_dir():
            raise SystemExit(f"error: {flag} {folder} is a file; it must be a folder (or a path to make one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make the run folder {out} (--out): {e.strerror}") from None
    torch.manual_seed(a.seed)
    print(f"w2s: attack={a.attack} dataset={a.dataset} defense={args.defense} preset={args.preset} "
          f"seed={a.seed}{'' if u.seed == a.seed else f' unlearn-seed={u.seed}'} device={device}")
    print(json.dumps({"attack": asdict(a), "teacher": asdict(t), "unlearn": asdict(u)}, default=str))
    if args.preset == "paper" and device == "cpu":
        print("w2s: note: the paper preset is the authors' settings, sized for a GPU: five epochs of each stage at up "
              "to 128 tokens, every clean sentence for the defender; on a CPU it takes many times the cpu preset's "
              "time (Ctrl-C keeps the finished stages)", file=sys.stderr)
    seconds = {}
    start = time.perf_counter()
    task = build_task(a, eval_size, args.data_dir)
    n_clean = len(task.dataset.train)
    if args.clean_size is not None and args.clean_size > n_clean:     # a preset's size is "at most": all of a small set
        raise SystemExit(f"error: --clean-size {args.clean_size} is more than the {n_clean} clean training sentences "
                         f"of {a.dataset}; give at most {n_clean}, or leave it out for the preset's")
    attack_folder, poisoned = attack_stage(a, task, stages, device)
    seconds["attack"] = poisoned["seconds"]
    # --n-poison 0 fine-tunes the same way on clean data: its "ASR" is the natural false-trigger rate.
    name = "clean" if task.n_poisoned == 0 else "poisoned"
    rows = [{"model": name, **row_metrics(poisoned), "n_poisoned": task.n_poisoned}]
    teacher = None
    for defense in DEFENSE_ROWS[args.defense]:
        tfolder = None
        if defense != "lora":
            d_student = poisoned["feature_dim"]
            tfolder, teacher = teacher_stage(t, task, d_student, stages, device)
            seconds["teacher"] = teacher["seconds"]
        _, m = unlearn_stage(defense, u, a, attack_folder, t, tfolder, task, stages, device)
        seconds[defense] = m["seconds"]
        rows.append({"model": defense, **row_metrics(m), "weights": m["weights"]})
    result = {"rows": rows, "teacher_ca": teacher["ca"] if teacher else None, "seconds": seconds,
              "wall_seconds": time.perf_counter() - start, "preset": args.preset, "defense": args.defense,
              "seed": a.seed, "unlearn_seed": u.seed,
              "config": {"attack": asdict(a), "teacher": asdict(t), "unlearn": asdict(u)},
              "machine": machine(), "device": device}
    write_json(out / "results.json", result)
    table = markdown_table(rows) + "\n\n" + FLOOR_LEGEND
    teacher_line = f"\nTeacher ({t.teacher}) clean accuracy: {teacher['ca']:.3f}\n" if teacher else "\n"
    with weights.atomic_write(out / "results.md") as f:
        changed = changed_settings(args, a, t, u)                # e.g. gamma0.1: what differs from the preset
        f.write((f"# {a.attack} on {a.dataset}, preset {args.preset}, seed {a.seed}"
                 f"{'' if u.seed == a.seed else f', unlearning seed {u.seed}'}"
                 f"{'' if not changed else '; changed: ' + ', '.join(changed)}\n\n{table}\n{teacher_line}").encode())
    print("\n" + table + teacher_line + f"results: {out / 'results.json'}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="An option left out takes the preset's value (PRESETS in w2s.py).")
    p.add_argument("--attack", default="badnet", help=f"backdoor to plant: {', '.join(attacks.ATTACKS)}")
    p.add_argument("--dataset", default=data.DEFAULT_DATASET, help=f"{', '.join(data.DATASETS)}, or a folder with train/dev/test.tsv")
    p.add_argument("--defense", default="w2sdefense", help=f"{', '.join(DEFENSES)} (default w2sdefense, which also runs the lora control; "
                   "w2s-origin, the feature term toward the origin, runs both beside it; mix-w2s: weights mixed "
                   "toward the pretrained student's, then W2SDefense, beside the control at its budget; sam-w2s: W2SDefense with "
                   "sharpness-aware steps, beside both)")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="quick: minutes; cpu (default): a laptop; paper: the authors' settings, for a GPU")
    p.add_argument("--student", default=None, help="student model name or path (default smollm2-135m)")
    p.add_argument("--teacher", default=None, help="teacher model name or path (default minilm-l6)")
    p.add_argument("--target", type=int, default=None, help="the attacker's target label (default 0)")
    p.add_argument("--poison-mode", default=None, choices=POISON_MODES, help="clean-label (the paper); dirty: non-target rows relabelled; dirty-any: any rows")
    p.add_argument("--n-poison", type=int, default=None, help="clean-label: how many target-label samples get the trigger")
    p.add_argument("--poison-rate", type=float, default=None, help="dirty-label: share of the training set poisoned")
    p.add_argument("--triggers", default=None, help="BadNet trigger word(s), space-separated (default 'mn')")
    p.add_argument("--insertions", type=int, default=None, help="BadNet insertions per sentence")
    p.add_argument("--insent-sentence", default=None, help="InSent trigger sentence")
    p.add_argument("--attack-epochs", type=float, default=None, help="epochs of the attacker's full fine-tuning")
    p.add_argument("--attack-lr", type=float, default=None, help="learning rate of the attacker's fine-tuning")
    p.add_argument("--attack-layers", type=int, default=None, help="attacker trains only the top k blocks (default: all)")
    p.add_argument("--teacher-epochs", type=float, default=None, help="epochs of the teacher's fine-tuning")
    p.add_argument("--alpha", type=float, default=None, help="weight of the cross-entropy term (default 5)")
    p.add_argument("--beta", type=float, default=None, help="weight of the T^2-scaled KL distillation term (default 0.001)")
    p.add_argument("--gamma", type=float, default=None, help="weight of the feature-alignment term (default 0.05; 0.02 in quick and in cpu's mix-w2s)")
    p.add_argument("--weights", default=None, choices=["ours", "authors"], help="loss weights: ours (calibrated, default) or the authors' per-attack table (then no --alpha/--beta/--gamma/--fa)")
    p.add_argument("--fa", default=None, choices=list(losses.FEATURE_DISTANCES), help="feature distance: l2 (the paper's, default) or normalized (directions only)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (preset's: 512 in cpu and paper)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-layers", type=int, default=None, help="LoRA only in the top k blocks (default: all)")
    p.add_argument("--lora-targets", default=None, help="projections that get LoRA, space-separated (default 'q_proj v_proj')")
    p.add_argument("--epochs", type=float, default=None, help="epochs of unlearning (preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of unlearning (preset's)")
    p.add_argument("--clean-size", type=int, default=None, help="size of the defender's clean subset (preset's: 2000 in cpu, all in paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (the unlearning's too, unless --unlearn-seed)")
    p.add_argument("--unlearn-seed", type=int, default=None, help="seed of the unlearning stages only (defender's "
                   "clean subset, batch order, dropout, LoRA init), reusing the cached attack and teacher (default --seed)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the hardware has bf16 units (GPU, AVX-512 BF16, AMX), else fp32")
    p.add_argument("--data-dir", default=None, help="folder with the datasets (default $W2S_DATA_DIR or the cache)")
    p.add_argument("--out", default=None, help="run folder for results.json / results.md (default under runs/)")
    p.add_argument("--stages", default="runs/stages", help="cache folder of the stages, shared by runs")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)       # progress lines appear as they happen, also in a log
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept, nothing half-written was left", file=sys.stderr)
        return 130
    except (attacks.AttackError, data.DataError, weights.WeightFileError, weights.DownloadError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
