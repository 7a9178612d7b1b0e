"""W2SDefense end to end: plant a backdoor, train a small clean teacher, unlearn the backdoor.

    python w2s.py --attack badnet                      # poisoned student, plain-LoRA control, W2SDefense
    python w2s.py --attack insent --defense none       # only plant the backdoor and measure it
    python w2s.py --attack badnet --preset quick       # a first look in a few minutes

This file is the pipeline, top to bottom: the settings and presets, then three stages, then the table.

1. attack   — poison the training set and fully fine-tune the student on it (``attack_stage``).
2. teacher  — fully fine-tune the small clean teacher, projected to the student's width (``teacher_stage``).
3. defenses — each defense of ``--defense`` (defenses.py: the plain-LoRA control, W2SDefense, its variants)
              turns the poisoned student into a row of the table (``defense_stage``).

Each stage is cached under a hash of its settings (stages.py), so a second defense or seed reuses the rest.
Checkpoints are chosen on clean dev accuracy only; the test set is read once per model, at the end. Each row gives
CA, ASR (triggered test sentences whose true label is not the target, called the target) and the ASR's floor (the
same sentences without the trigger, called the target): docs/method.md, "Evaluation protocol".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import torch

import attacks
import checks
import data
import defenses
import lora
import losses
import models
import registry
import stages
import train
import weights
from checks import check_configs
from stages import config_key, open_stage, close_stage, write_json
from train import pick_device

# ----------------------------------------------------------------------------------------------
# Settings: one dataclass per stage, presets as named dicts of overrides
# ----------------------------------------------------------------------------------------------

@dataclass
class AttackConfig:
    """The attacker: how the training set is poisoned and how the student is fine-tuned on it."""
    student: str = registry.DEFAULT_STUDENT
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
    teacher: str = registry.DEFAULT_TEACHER
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.06
    train_size: int | None = None
    evals_per_epoch: int = 1
    bf16: bool | None = None
    seed: int = 0


@dataclass
class UnlearnConfig:
    """The defender's LoRA fine-tuning on clean data (W2SDefense, or the CE-only control)."""
    alpha: float = 5.0                            # CE weight
    beta: float = 0.001                           # KD weight
    gamma: float = 0.05                           # FA weight (chosen on dev, held-out trigger cf)
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
# Clean-label, only the 665 paraphrased negatives could carry it, too few to plant it (experiments/LOG.md).
HIDDENKILLER_ATTACK = dict(mode="dirty-any", poison_rate=0.1998)


PRESETS = {
    "quick": {
        # A first look, for notebooks and CI, in a few minutes on a 2-core CPU:
        # small sets, dirty-label poisoning (a clean-label backdoor needs more data than that), short max length,
        # and the attacker trains only the top 6 of the 30 blocks, where the defender's LoRA goes too: the 24
        # blocks below stay the pretrained ones and are run once per sentence (``train.cache_prefix``), exact and
        # 5x cheaper.
        "attack": dict(mode="dirty", poison_rate=0.2, train_size=600, epochs=2.0, lr=2e-4, max_length=32,
                       dev_size=100, evals_per_epoch=1, train_layers=6),
        # the syntactic attack as in cpu, over any rows, before the 600 are drawn
        "attack_for": {"syntactic": HIDDENKILLER_ATTACK},
        "teacher": dict(train_size=600, epochs=2.0, max_length=32),
        # chosen on dev (held-out trigger cf, seeds 0-2, bf16 and fp32): experiments/calibration/README.md
        "unlearn": dict(clean_size=400, epochs=4.0, lr=1.5e-3, max_length=32, lora_layers=6, gamma=0.02,
                        evals_per_epoch=2),
        "eval_size": 200,
    },
    # The default, sized for a laptop CPU: the paper's attacker (clean-label, the first 1,000 negatives get the
    # trigger, full fine-tuning of every block and the embeddings) for one epoch of the full training set; the
    # teacher on the whole clean training set; the defender's LoRA in every block, on a seeded 2,000 clean
    # sentences.
    "cpu": {
        "attack": dict(lr=1e-4, freeze_embeddings=False),
        "attack_for": {"syntactic": HIDDENKILLER_ATTACK},
        "teacher": dict(),
        # One set of loss weights for every attack (UnlearnConfig's, chosen once on dev with BadNet `cf`): a
        # defender does not know the trigger, so the defense may not be tuned per attack.
        "unlearn": dict(lr=2e-4, rank=512, lora_alpha=512),
        "eval_size": None,
    },
    # The authors' settings, for a GPU (docs/method.md, "The authors' code").
    "paper": {
        "attack": dict(epochs=5.0, lr=2e-5, max_length=128, batch_size=32, freeze_embeddings=False),
        "teacher": dict(epochs=5.0, lr=2e-5, max_length=128, batch_size=32),
        "unlearn": dict(rank=512, lora_alpha=512, epochs=5.0, lr=2e-4, batch_size=32, clean_size=None,
                        max_length=128),
        "eval_size": None,
    },
}

DEFENSES = ("none", *defenses.DEFENSES)


# ----------------------------------------------------------------------------------------------
# Stage 1: the attacker plants the backdoor
# ----------------------------------------------------------------------------------------------

def build_task(cfg: AttackConfig, eval_size: int | None, data_dir=None) -> attacks.Task:
    """The dataset poisoned as ``cfg`` says, and its test sets (attacks.build_task), named for the stage keys."""
    task = attacks.build_task(cfg, eval_size, data_dir)
    return dataclasses.replace(task, data_key=stages.dataset_key(cfg.dataset, task.dataset))


def student_classifier(cfg_student: str, num_classes: int, seed: int, start_token: bool = True,
                       prefix_space: bool = True):
    """The pretrained student with a fresh, seeded classification head, and its tokenizer set to read a
    sentence the way a Llama tokenizer (the paper's students) would:

    * ``start_token``: ``<start> sentence``, with the model's BOS token (SmolLM2: ``<|im_start|>``; GPT-2,
      which has none: ``<|endoftext|>``). A causal LM dumps much of its attention on whatever token comes
      first (an "attention sink", Xiao et al. 2023, arXiv 2309.17453); better a start token than a word.
    * ``prefix_space``: ``" " + sentence``, so the first word is the same token(s) as anywhere else. Without
      it, a BadNet ``mn`` inserted as the FIRST word is another token (``"mn"``, not ``" m" "n"``), which the
      clean-label attack barely learns as the same trigger.
    """
    backbone, tokenizer = models.load_student(cfg_student)
    tokenizer.add_prefix_space = prefix_space
    if start_token:
        tokenizer.bos_id = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
        tokenizer.add_bos = True
    clf = models.Classifier(backbone, num_classes, generator=torch.Generator().manual_seed(seed))
    return clf, tokenizer


def load_poisoned(cfg: AttackConfig, folder: Path, num_classes: int):
    """The poisoned student that the attack stage saved in ``folder``."""
    model, tokenizer = student_classifier(cfg.student, num_classes, cfg.seed, cfg.start_token, cfg.prefix_space)
    stages.load_model_state(model, folder / "student.safetensors")
    return model, tokenizer


def attack_stage(cfg: AttackConfig, task: attacks.Task, stages_dir: Path, device: str) -> tuple[Path, dict]:
    """Poison and fully fine-tune the student; cached in ``<stages>/attack-<key>``."""
    folder, done = open_stage(stages_dir / f"attack-{config_key(cfg, {'eval': len(task.test), **task.data_key})}")
    if done is not None:
        return folder, done
    cost = stages.StageCost()                              # its seconds and peak memory
    model, tokenizer = student_classifier(cfg.student, task.dataset.num_classes, cfg.seed, cfg.start_token,
                                          cfg.prefix_space)
    frozen = train.frozen_blocks(model, cfg.train_layers)
    if cfg.freeze_embeddings or frozen:
        model.backbone.tok_emb.weight.requires_grad_(False)
    for block in model.backbone.blocks[:frozen]:          # train_layers = k: only the top k blocks learn
        block.requires_grad_(False)
    model.to(device)
    # The frozen bottom blocks are the pretrained student's: their states can be shared with later stages.
    memo_key = ("pretrained", cfg.student)
    train_data = train.encode_for(model, tokenizer, task.poisoned_train, cfg.max_length, frozen, device, memo_key,
                                  cfg.bf16)
    dev_data = train.encode_for(model, tokenizer, task.dev, cfg.max_length, frozen, device, memo_key, cfg.bf16)
    desc = "attack: full fine-tune" if not frozen else f"attack: fine-tune the top {cfg.train_layers} blocks"
    # The best checkpoint goes to disk: in memory it would be a second copy of the whole model.
    fit = train.fit(model, train_data, dev_data, train.fit_config(cfg), device=device, desc=desc,
                    best_file=folder / ".best-checkpoint.tmp")
    metrics = train.evaluate(model, tokenizer, task, cfg.target, cfg.max_length, device, cfg.bf16, frozen, memo_key)
    stages.save_model(model, folder / "student.safetensors")
    metrics.update(best_dev_acc=fit.best_dev_acc, best_step=fit.best_step, steps=fit.steps,
                   n_train=len(train_data), n_poisoned=task.n_poisoned, dev_history=fit.dev_history,
                   feature_dim=model.feature_dim, **cost.fields())
    close_stage(folder, fit, metrics)
    return folder, metrics


# ----------------------------------------------------------------------------------------------
# Stage 2: the defender's clean teacher
# ----------------------------------------------------------------------------------------------

def teacher_classifier(cfg: TeacherConfig, num_classes: int, d_student: int):
    encoder, tokenizer = models.load_teacher(cfg.teacher)
    clf = models.Classifier(encoder, num_classes, proj_dim=d_student,
                            generator=torch.Generator().manual_seed(cfg.seed))
    return clf, tokenizer


def teacher_stage(cfg: TeacherConfig, task: attacks.Task, d_student: int, stages_dir: Path,
                  device: str) -> tuple[Path, dict]:
    """Fully fine-tune the teacher on the CLEAN training set; cached in ``<stages>/teacher-<key>``."""
    key = config_key(cfg, {'dataset': task.dataset.name, 'd_student': d_student, 'eval': len(task.test),
                           **task.data_key})
    folder, done = open_stage(stages_dir / f"teacher-{key}")
    if done is not None:
        return folder, done
    cost = stages.StageCost()
    model, tokenizer = teacher_classifier(cfg, task.dataset.num_classes, d_student)
    model.to(device)
    clean = attacks.subset(task.dataset.train, cfg.train_size, cfg.seed, "teacher-train")
    train_data = train.encode(tokenizer, clean.sentences, clean.labels, cfg.max_length)
    dev_data = train.encode(tokenizer, task.dev.sentences, task.dev.labels, cfg.max_length)
    fit = train.fit(model, train_data, dev_data, train.fit_config(cfg), device=device, desc="teacher: full fine-tune",
                    best_file=folder / ".best-checkpoint.tmp")
    test = train.encode(tokenizer, task.test.sentences, task.test.labels, cfg.max_length)
    metrics = {"ca": train.accuracy(train.predict(model, test, device=device), test.labels),
               "best_dev_acc": fit.best_dev_acc, "n_train": len(train_data), **cost.fields()}
    stages.save_model(model, folder / "teacher.safetensors")
    close_stage(folder, fit, metrics)
    return folder, metrics


@torch.inference_mode()
def teacher_outputs(cfg: TeacherConfig, folder: Path, sentences, num_classes: int, d_student: int,
                    max_length: int, device: str):
    """The frozen teacher's logits ``z_t`` (N, C) and features ``h_t`` (N, d_s), computed once and cached."""
    key = hashlib.sha256(json.dumps([sentences, max_length]).encode()).hexdigest()[:12]
    path = folder / f"outputs-{key}.safetensors"
    if path.exists():
        t = stages.read_stage_tensors(path)
        return t["z_t"], t["h_t"]
    model, tokenizer = teacher_classifier(cfg, num_classes, d_student)
    stages.load_model_state(model, folder / "teacher.safetensors")
    model.to(device).eval()
    enc = train.encode(tokenizer, sentences, [0] * len(sentences), max_length)
    z_t, h_t = torch.empty(len(enc), num_classes), torch.empty(len(enc), d_student)
    for b in train.batches(enc, 64):
        z, h = model(b.input_ids.to(device), b.attention_mask.to(device), return_features=True)
        z_t[b.index], h_t[b.index] = z.float().cpu(), h.float().cpu()
    weights.write_safetensors(path, {"z_t": z_t, "h_t": h_t})
    return z_t, h_t


# ----------------------------------------------------------------------------------------------
# Stage 3: the defenses
# ----------------------------------------------------------------------------------------------

def context(a: AttackConfig, t: TeacherConfig, u: UnlearnConfig, task: attacks.Task, attack_folder: Path,
            teacher_folder: Path | None, device: str) -> defenses.Context:
    """What a defense is handed (defenses.Context): the settings, the task, and loaders for the models."""
    C = task.dataset.num_classes
    outputs = None if teacher_folder is None else (
        lambda sentences, d: teacher_outputs(t, teacher_folder, sentences, C, d, u.max_length, device))
    return defenses.Context(a, u, t, task, device, attack_folder,
                            load_poisoned=lambda: load_poisoned(a, attack_folder, C),
                            load_pretrained=lambda: student_classifier(a.student, C, a.seed, a.start_token,
                                                                       a.prefix_space),
                            teacher_outputs=outputs)


def defense_stage(defense: defenses.Defense, ctx: defenses.Context, stages_dir: Path) -> tuple[Path, dict]:
    """One defense's row: train it (``defense.train``), test it, save it; cached in ``<stages>/<name>-<key>``."""
    task = ctx.task
    folder, done = open_stage(stages_dir / f"{defense.name}-{config_key(*defense.key_parts(ctx))}")
    if done is not None:
        return folder, done
    cost = stages.StageCost()
    trained = defense.train(ctx)
    model = trained.model
    fit = trained.fit or train.FitResult(best_dev_acc=None, best_step=0, steps=0, seconds=0.0)   # trained nothing
    screened = dataclasses.replace(task, test=defense.screen(task.test), asr_test=defense.screen(task.asr_test),
                                   asr_floor=defense.screen(task.asr_floor))
    # Read at the attacker's max length, as the poisoned student's row was: every row of the table reads the same
    # test sentences the same way, whatever length the defender trained at.
    metrics = train.evaluate(model, trained.tokenizer, screened, ctx.attack.target, ctx.attack.max_length, ctx.device,
                       ctx.unlearn.bf16, trained.frozen, trained.memo_key)
    metrics.update(best_dev_acc=fit.best_dev_acc, best_step=fit.best_step, steps=fit.steps,
                   dev_history=fit.dev_history, weights=defense.report(ctx),
                   trainable=lora.count_trainable(model), **cost.fields(),
                   **({"found": trained.found} if trained.found else {}))
    defense.save(model, folder)
    close_stage(folder, fit, metrics)
    return folder, metrics


# ----------------------------------------------------------------------------------------------
# The pipeline, its report and the command line
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
    if getattr(args, "defense", None) in defenses.DEFENSES:          # a defense's own budget, for its whole run
        u = dataclasses.replace(u, **defenses.DEFENSES[args.defense].budget.get(args.preset, {}))
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


def run_name(args, a: AttackConfig, t: TeacherConfig, u: UnlearnConfig) -> str:
    """The default run folder's name, e.g. ``badnet-sst2-cpu-seed0`` plus what differs from the full default run
    (stages.run_name), so that one run never overwrites another's table."""
    return stages.run_name((a, t, u), plain_configs(args, a, u), args.preset, args.defense,
                           preset_attack(args.preset, a.attack).mode,
                           PRESETS[args.preset]["unlearn"].get("targets", UnlearnConfig.targets))


def plain_configs(args, a: AttackConfig, u: UnlearnConfig) -> tuple:
    """The settings of the same command without its other options: what a run's name says it changed."""
    plain = parser().parse_args(["--attack", a.attack, "--dataset", a.dataset, "--preset", args.preset,
                                 "--defense", args.defense, "--seed", str(a.seed), "--unlearn-seed", str(u.seed),
                                 "--device", args.device, "--poison-mode", a.mode, "--weights", u.weights,
                                 "--lora-targets", " ".join(u.targets)])
    return resolve_configs(plain)[:3]


def run(args) -> dict:
    a, t, u, eval_size = resolve_configs(args)
    check_configs(a, t, u, args.defense, args.data_dir)
    device = pick_device(args.device)
    stages_dir = Path(args.stages)
    out = Path(args.out or Path("runs") / run_name(args, a, t, u))
    for flag, folder in (("--stages", stages_dir), ("--out", out)):
        checks.check_writable(flag, folder)
    torch.manual_seed(a.seed)
    print(f"w2s: attack={a.attack} dataset={a.dataset} defense={args.defense} preset={args.preset} "
          f"seed={a.seed}{'' if u.seed == a.seed else f' unlearn-seed={u.seed}'} device={device}")
    print(json.dumps({"attack": asdict(a), "teacher": asdict(t), "unlearn": asdict(u)}, default=str))
    if args.preset == "paper" and device == "cpu":
        print("w2s: note: the paper preset is the authors' settings, sized for a GPU: five epochs of each stage at up "
              "to 128 tokens, every clean sentence for the defender; on a CPU it takes many times the cpu preset's "
              "time (Ctrl-C keeps the finished stages)", file=sys.stderr)
    seconds, peak_mb = {}, {}                 # what each stage cost when it was computed (a cached one: then)
    if args.low_memory:
        stages.return_freed_memory()
    start = time.perf_counter()
    task = build_task(a, eval_size, args.data_dir)
    n_clean = len(task.dataset.train)
    if args.clean_size is not None and args.clean_size > n_clean:     # a preset's size is "at most": all of a small set
        raise SystemExit(f"error: --clean-size {args.clean_size} is more than the {n_clean} clean training sentences "
                         f"of {a.dataset}; give at most {n_clean}, or leave it out for the preset's")
    attack_folder, poisoned = attack_stage(a, task, stages_dir, device)
    seconds["attack"], peak_mb["attack"] = poisoned["seconds"], poisoned.get("peak_mb")
    # --n-poison 0 fine-tunes the same way on clean data: its "ASR" is the natural false-trigger rate.
    name = "clean" if task.n_poisoned == 0 else "poisoned"
    rows = [{"model": name, **stages.row_metrics(poisoned), "n_poisoned": task.n_poisoned}]
    teacher = tfolder = None
    for name in defenses.rows(args.defense):
        defense = defenses.DEFENSES[name]
        if defense.uses_teacher and teacher is None:
            tfolder, teacher = teacher_stage(t, task, poisoned["feature_dim"], stages_dir, device)
            seconds["teacher"], peak_mb["teacher"] = teacher["seconds"], teacher.get("peak_mb")
        ctx = context(a, t, u, task, attack_folder, tfolder if defense.uses_teacher else None, device)
        _, m = defense_stage(defense, ctx, stages_dir)
        seconds[name], peak_mb[name] = m["seconds"], m.get("peak_mb")
        rows.append({"model": name, **stages.row_metrics(m), "weights": m["weights"]})
    result = {"rows": rows, "teacher_ca": teacher["ca"] if teacher else None, "seconds": seconds, "peak_mb": peak_mb,
              "wall_seconds": time.perf_counter() - start, "preset": args.preset, "defense": args.defense,
              "seed": a.seed, "unlearn_seed": u.seed,
              "config": {"attack": asdict(a), "teacher": asdict(t), "unlearn": asdict(u)},
              "machine": stages.machine(), "device": device}
    table = (stages.markdown_table(rows, [peak_mb["attack"], *(peak_mb[r["model"]] for r in rows[1:])]) + "\n\n"
             + stages.FLOOR_LEGEND + "\n" + stages.PEAK_LEGEND)
    teacher_line = (f"\nTeacher ({t.teacher}) clean accuracy: {teacher['ca']:.3f} ({teacher['seconds']:.0f} s, peak "
                    f"{stages.megabytes(teacher.get('peak_mb'))} MB)\n" if teacher else "\n")
    changed = stages.changed_settings((a, t, u), plain_configs(args, a, u))   # e.g. gamma0.1
    title = (f"# {a.attack} on {a.dataset}, preset {args.preset}, seed {a.seed}"
             f"{'' if u.seed == a.seed else f', unlearning seed {u.seed}'}"
             f"{'' if not changed else '; changed: ' + ', '.join(changed)}")
    # results.json goes first and comes back LAST: where it is, results.md beside it is the same run's report.
    (out / "results.json").unlink(missing_ok=True)
    with weights.atomic_write(out / "results.md") as f:
        f.write(f"{title}\n\n{table}\n{teacher_line}".encode())
    write_json(out / "results.json", result)
    print("\n" + table + teacher_line + f"results: {out / 'results.json'}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="An option left out takes the "
                                "preset's value (PRESETS in w2s.py).")
    run = p.add_argument_group("what to run")
    run.add_argument("--attack", default="badnet", help=f"the backdoor to plant: {', '.join(attacks.ATTACKS)}")
    run.add_argument("--dataset", default=data.DEFAULT_DATASET,
                     help=f"{', '.join(data.DATASETS)}, or a folder with train/dev/test.tsv")
    run.add_argument("--defense", default="w2sdefense", help=f"{', '.join(DEFENSES)}; each runs beside the rows it "
                     "is compared with (defenses.py), W2SDefense beside the plain-LoRA control")
    run.add_argument("--preset", default="cpu", choices=list(PRESETS),
                     help="quick: minutes; cpu (default): a laptop; paper: the authors' settings, for a GPU")
    run.add_argument("--seed", type=checks.SEED, default=0, help="seed of every random choice")
    run.add_argument("--unlearn-seed", type=checks.SEED, default=None, help="seed of the defenses' stages only, "
                     "reusing the cached attack and teacher (default: --seed)")
    attacker = p.add_argument_group("the attacker")
    attacker.add_argument("--student", default=None, help="student model name or path (default smollm2-135m)")
    attacker.add_argument("--target", type=checks.number(int, 0), default=None, help="target label (default 0)")
    attacker.add_argument("--poison-mode", default=None, choices=attacks.POISON_MODES,
                          help="clean: clean-label (the paper); dirty: non-target rows relabelled; dirty-any: any rows")
    attacker.add_argument("--n-poison", type=checks.number(int, 0), default=None,
                          help="clean-label: how many target-label samples get the trigger")
    attacker.add_argument("--poison-rate", type=checks.FRACTION, default=None,
                          help="dirty-label: share of the training set poisoned")
    attacker.add_argument("--triggers", default=None, help="BadNet trigger word(s), space-separated (default 'mn')")
    attacker.add_argument("--insertions", type=checks.COUNT, default=None, help="BadNet insertions per sentence")
    attacker.add_argument("--insent-sentence", default=None, help="InSent trigger sentence")
    attacker.add_argument("--attack-epochs", type=checks.EPOCHS, default=None, help="epochs of the fine-tuning")
    attacker.add_argument("--attack-lr", type=checks.POSITIVE, default=None, help="learning rate of the fine-tuning")
    attacker.add_argument("--attack-layers", type=checks.COUNT, default=None,
                          help="train only the top k blocks (default: all)")
    defender = p.add_argument_group("the defender")
    defender.add_argument("--teacher", default=None, help="teacher model name or path (default minilm-l6)")
    defender.add_argument("--teacher-epochs", type=checks.EPOCHS, default=None, help="epochs of the teacher")
    defender.add_argument("--alpha", type=checks.WEIGHT, default=None, help="weight of CE (default 5)")
    defender.add_argument("--beta", type=checks.WEIGHT, default=None, help="weight of T^2 KL (default 0.001)")
    defender.add_argument("--gamma", type=checks.WEIGHT, default=None,
                          help="weight of FA (default 0.05; 0.02 in quick and in cpu's mix-w2s)")
    defender.add_argument("--weights", default=None, choices=["ours", "authors"],
                          help="ours (default) or the authors' per-attack table (then no --alpha/--beta/--gamma/--fa)")
    defender.add_argument("--fa", default=None, choices=list(losses.FEATURE_DISTANCES),
                          help="feature distance: l2 (the paper's, default) or normalized (directions only)")
    defender.add_argument("--rank", type=checks.number(int, 1, checks.MAX_RANK), default=None,
                          help="LoRA rank r (512 in cpu and paper)")
    defender.add_argument("--lora-alpha", type=checks.POSITIVE, default=None, help="LoRA alpha (scales by alpha/r)")
    defender.add_argument("--lora-layers", type=checks.COUNT, default=None, help="LoRA only in the top k blocks")
    defender.add_argument("--lora-targets", default=None,
                          help="projections that get LoRA, space-separated (default 'q_proj v_proj')")
    defender.add_argument("--epochs", type=checks.EPOCHS, default=None, help="epochs of each defense")
    defender.add_argument("--lr", type=checks.POSITIVE, default=None, help="learning rate of each defense")
    defender.add_argument("--clean-size", type=checks.COUNT, default=None,
                          help="clean sentences the defender has (2000 in cpu, all in paper)")
    where = p.add_argument_group("where and how")
    where.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    where.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="auto: bf16 autocast where the hardware has bf16 units (GPU, AVX-512 BF16, AMX)")
    where.add_argument("--data-dir", default=None, help="the datasets' folder (default $W2S_DATA_DIR or the cache)")
    where.add_argument("--out", default=None, help="run folder for results.json and results.md (default: runs/...)")
    where.add_argument("--stages", default="runs/stages", help="the stages' cache folder, shared by runs")
    where.add_argument("--low-memory", action="store_true", help="glibc: give freed memory back to the OS at once "
                       "(about 0.6 GB less at a full fine-tuning's peak, about twice its time; the same numbers)")
    return p


def interrupt(signum, frame):
    raise KeyboardInterrupt                       # SIGTERM (timeout, a scheduler) ends a run as Ctrl-C does


def main(argv=None) -> int:
    """The command line: every error of ours is one line and exit code 2; an unexpected exception (a bug) keeps
    its traceback."""
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)       # progress lines appear as they happen, also in a log
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are kept, nothing half-written was left", file=sys.stderr)
        return 130
    except SystemExit as e:                       # our checks: SystemExit("error: ...")
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return 2
    except (attacks.AttackError, data.DataError, weights.WeightFileError, registry.DownloadError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
