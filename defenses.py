"""The defenses ``w2s.py --defense`` offers: one class each, with what it computes in its docstring.

    Control     plain LoRA on clean data: alpha * CE                 the row every defense stands beside
    W2SDefense  alpha * CE + beta * T^2 * KL(p_t || p_s) + gamma * FA  the paper's method (arXiv 2410.14425)
    W2SOrigin   W2SDefense with FA pulled toward the origin          do the teacher's features matter?
    MixW2S      the backbone mixed back toward the pretrained one, then W2SDefense
    SamW2S      W2SDefense with sharpness-aware steps (sam.py)
    MuScleLoRA  from the PRETRAINED student, LoRA + a multi-scale head branch on the POISONED training set,
                every gradient aligned with a clean reference gradient (arXiv 2402.12026): a training-time defense
    Beear       CE with and without a searched universal drift of the hidden states (BEEAR-style)
    Crow        CE + 5.5 * consistency of consecutive blocks under an FGSM nudge of the input embeddings (CROW)

The pipeline (``w2s.defense_stage``) runs every defense the same way::

    trained = defense.train(ctx)                    # ctx: a Context, below; the model and its training log
    metrics = train.evaluate(trained.model, ...)    # CA, ASR and floor on the test sets, after defense.screen
    defense.save(trained.model, folder)             # what ``reload`` needs to rebuild the model

Adding a defense means one class here, registered in ``DEFENSES``, and one test file. The interface is meant for
more than today's unlearning defenses:

* a defense that trains on the poisoned training set from the pretrained student overrides ``start``
  (``ctx.load_pretrained``) and ``train_split`` (``ctx.task.poisoned_train``), or ``train`` whole (MuScleLoRA);
* a defense that perturbs hidden states inside the model (BEEAR, CROW) overrides ``loss`` or ``train`` and hooks
  the blocks of ``model.backbone``;
* a test-time input filter (ONION) trains nothing and overrides ``screen``, which rewrites the sentences the model
  is tested on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import attacks
import data
import lora
import losses
import models
import sam
import stages
import train

# What a defender may have; each defense's ``needs`` names some of these.
NEEDS = ("clean data", "pretrained weights", "poisoned training set", "teacher", "target or trigger")

# The authors' per-attack loss weights (alpha, beta, gamma) for W2SDefense, kept as a named setting
# (``--weights authors``): docs/method.md, "The authors' code".
AUTHORS_WEIGHTS = {"badnet": (5.0, 0.001, 0.001), "insent": (3.0, 0.01, 0.001), "syntactic": (1.0, 0.035, 0.002)}


@dataclass
class Context:
    """What the pipeline hands a defense: the run's settings and data, and loaders for the models it may use."""
    attack: Any                              # w2s.AttackConfig: the attacker's settings
    unlearn: Any                             # w2s.UnlearnConfig: the defender's settings
    teacher: Any                             # w2s.TeacherConfig
    task: attacks.Task                       # the clean splits, the poisoned training set and the test sets
    device: str
    attack_folder: Path                      # the attack stage's folder: the poisoned student
    load_poisoned: Callable[[], tuple]       # () -> (a fresh copy of the poisoned student classifier, tokenizer)
    load_pretrained: Callable[[], tuple]     # () -> (the pretrained student with a fresh head, tokenizer)
    # (sentences, feature width) -> the frozen teacher's logits (N, C) and features (N, d); None: no teacher trained
    teacher_outputs: Callable[[list, int], tuple] | None = None


@dataclass
class Trained:
    """What ``Defense.train`` returns: the model to test, and how to read it (its frozen prefix) and its log."""
    model: torch.nn.Module
    tokenizer: Any
    fit: train.FitResult | None                  # None: the defense trained nothing (a test-time filter)
    frozen: int = 0                          # bottom blocks whose states are cached (``train.cache_prefix``)
    memo_key: Any = None                     # whose those blocks are, to share their cached states
    found: dict | None = None                # what the defense found on its way (BEEAR: its guess of the target)


class Defense:
    """The interface. ``name`` is the ``--defense`` value and the row's label; ``beside`` the rows the table
    shows before it (the control first); ``needs`` what the defender must have (``NEEDS``); ``budget`` overrides
    of the unlearning settings, per preset, for this defense's whole run (its control's too: the same budget)."""
    name = ""
    beside: tuple = ("lora",)
    needs: tuple = ("clean data",)
    starts_from = "the poisoned student"      # what the defender is handed: a poisoned model, or a pretrained one
    budget: dict = {}

    @property
    def uses_teacher(self) -> bool:
        return "teacher" in self.needs

    def train(self, ctx: Context) -> Trained:
        raise NotImplementedError

    def screen(self, split):
        """The sentences the model is tested on, as this defense rewrites them at test time (none does yet)."""
        return split

    def key_parts(self, ctx: Context) -> list:
        """Every setting the stage reads, hashed into its cache folder's name (``stages.config_key``)."""
        return [ctx.unlearn, ctx.attack, ctx.teacher, self.stage_info(ctx)]

    def stage_info(self, ctx: Context) -> dict:
        return {"defense": self.name, "eval": len(ctx.task.test), **ctx.task.data_key}

    def report(self, ctx: Context) -> dict:
        """The settings printed beside the row in ``results.json``."""
        return {}

    def save(self, model, folder: Path) -> None:
        raise NotImplementedError

    def reload(self, ctx: Context, folder: Path):
        """The trained model again, from ``folder``: (model in eval mode, tokenizer)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# The control, and W2SDefense on top of it
# ----------------------------------------------------------------------------------------------

def add_lora(model, cfg, trainable=("head",), generator: torch.Generator | None = None) -> int:
    """LoRA on the projections named by ``cfg.targets`` (the preset: attention query and value) of the top
    ``cfg.lora_layers`` blocks, or of all; the classification head stays fully trainable (``trainable``: the
    prefixes of the parameters kept trainable beside the adapters). The A matrices are drawn from ``generator``,
    by default one seeded with ``cfg.seed``. Returns how many bottom blocks stay frozen."""
    frozen = train.frozen_blocks(model, cfg.lora_layers)
    present = {name.rsplit(".", 1)[-1] for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [name for name in cfg.targets if name not in present]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not projections of this student; it has {sorted(present)}")
    lora.inject_lora(model, targets=tuple(cfg.targets), r=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     generator=torch.Generator().manual_seed(cfg.seed) if generator is None else generator,
                     trainable=trainable,
                     within=[f"backbone.blocks.{i}." for i in range(frozen, len(model.backbone.blocks))])
    return frozen


def fa_distance(cfg) -> str:
    """The feature distance: ours (``cfg.fa``), or the paper's plain L2 with the authors' weights."""
    return "l2" if cfg.weights == "authors" else cfg.fa


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


class Control(Defense):
    """Plain LoRA on clean data, the control every defense stands beside: ``L = alpha * CE(z_s, y)``.

    The poisoned student gets LoRA adapters (``add_lora``) and a trainable head, and trains on a seeded subset of
    the CLEAN training set (``clean_size`` sentences) with the same seed, data and budget as W2SDefense. It keeps
    W2SDefense's alpha, which matters: the gradient is clipped, and the authors' alpha is 3 for InSent and 1 for
    the syntactic attack. The best step is chosen on clean dev accuracy.
    """
    name = "lora"
    beside = ()

    def loss_weights(self, ctx: Context) -> tuple[float, float, float]:
        """(alpha, beta, gamma): ours, or the authors' per-attack table with ``--weights authors``."""
        u = ctx.unlearn
        alpha, beta, gamma = AUTHORS_WEIGHTS[ctx.attack.attack] if u.weights == "authors" else (u.alpha, u.beta, u.gamma)
        return alpha, 0.0, 0.0

    def key_parts(self, ctx: Context) -> list:
        # The control reads neither the W2S weights nor the teacher: leave them out, so changing them reuses it.
        alpha = self.loss_weights(ctx)[0]
        u = dataclasses.replace(ctx.unlearn, alpha=alpha, beta=0.0, gamma=0.0, fa="", weights="")
        return [u, ctx.attack, None, self.stage_info(ctx)]

    def start(self, ctx: Context):
        """The model the unlearning begins from: the poisoned student."""
        return ctx.load_poisoned()

    def train_split(self, ctx: Context):
        """What it trains on: a seeded subset of the CLEAN training set, ``clean_size`` sentences."""
        u = ctx.unlearn
        return attacks.subset(ctx.task.dataset.train, u.clean_size, u.seed, "defender-clean")

    def prefix_owner(self, ctx: Context, model, frozen: int) -> tuple:
        """Whose bottom ``frozen`` blocks these are, to share cached prefix states: below the blocks the attacker
        trained, the poisoned student is still the pretrained one."""
        if frozen <= train.frozen_blocks(model, ctx.attack.train_layers):
            return ("pretrained", ctx.attack.student)
        return ("poisoned", str(ctx.attack_folder))

    def loss(self, ctx: Context, model, clean) -> Callable:
        """The ``loss_fn`` for ``train.fit`` on the clean sentences ``clean``."""
        alpha, _, _ = self.loss_weights(ctx)
        return unlearning_loss(alpha, 0.0, 0.0, ctx.unlearn.T)

    def train(self, ctx: Context) -> Trained:
        u, device = ctx.unlearn, ctx.device
        model, tokenizer = self.start(ctx)
        frozen = add_lora(model, u)
        model.to(device)
        clean = self.train_split(ctx)
        memo_key = self.prefix_owner(ctx, model, frozen)
        train_data = train.encode_for(model, tokenizer, clean, u.max_length, frozen, device, memo_key, u.bf16)
        dev_data = train.encode_for(model, tokenizer, ctx.task.dev, u.max_length, frozen, device, memo_key, u.bf16)
        loss_fn = self.loss(ctx, model, clean)
        fit = train.fit(model, train_data, dev_data, train.fit_config(u, warmup_ratio=0.0), loss_fn=loss_fn,
                        device=device, desc=f"unlearn: {self.name}")
        return Trained(model, tokenizer, fit, frozen, memo_key)

    def report(self, ctx: Context) -> dict:
        alpha, beta, gamma = self.loss_weights(ctx)
        return {"alpha": alpha, "beta": beta, "gamma": gamma, "T": ctx.unlearn.T, "fa": fa_distance(ctx.unlearn)}

    def save(self, model, folder: Path) -> None:
        lora.save_lora(model, folder / "lora.safetensors")

    def reload(self, ctx: Context, folder: Path):
        model, tokenizer = self.start(ctx)
        add_lora(model, ctx.unlearn)
        lora.load_lora_state_dict(model, stages.read_stage_tensors(folder / "lora.safetensors"))
        return model.eval(), tokenizer


class W2SDefense(Control):
    """W2SDefense (Zhao et al. 2024): the control's LoRA run, distilled from a small clean teacher::

        L = alpha * CE(z_s, y) + beta * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + gamma * FA(h_s, h_t)

    ``z_s``, ``h_s``: the student's logits and pooled feature; ``z_t``, ``h_t``: the frozen teacher's logits and
    feature projected to the student's width, computed once per clean sentence. ``FA`` is
    ``losses.feature_alignment`` (or its direction-only form with ``--fa normalized``). Each term is one function
    in losses.py, and ``losses.w2s_loss`` adds them up.
    """
    name = "w2sdefense"
    beside = ("lora",)
    needs = ("clean data", "teacher")

    def loss_weights(self, ctx: Context) -> tuple[float, float, float]:
        u = ctx.unlearn
        return AUTHORS_WEIGHTS[ctx.attack.attack] if u.weights == "authors" else (u.alpha, u.beta, u.gamma)

    def key_parts(self, ctx: Context) -> list:
        return Defense.key_parts(self, ctx)              # all of it: unlike the control, it reads the teacher

    def feature_target(self, h_t: torch.Tensor) -> torch.Tensor:
        """What the feature term pulls each clean sentence's feature toward: its teacher feature ``h_t[i]``."""
        return h_t

    def loss(self, ctx: Context, model, clean) -> Callable:
        alpha, beta, gamma = self.loss_weights(ctx)
        z_t, h_t = ctx.teacher_outputs(clean.sentences, model.feature_dim)
        return unlearning_loss(alpha, beta, gamma, ctx.unlearn.T, z_t, self.feature_target(h_t),
                               fa_distance(ctx.unlearn))


class W2SOrigin(W2SDefense):
    """The ablation of W2SDefense's feature term: FA pulls each feature toward the origin instead of the teacher's,
    ``FA = 1/B * sum_i ||h_s[i]||^2``, which asks only for a smaller feature (the teacher's logits still feed the
    KL term). If it removes as much of the backdoor, the teacher's features are not what does it."""
    name = "w2s-origin"
    beside = ("lora", "w2sdefense")

    def feature_target(self, h_t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h_t)


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


class MixW2S(W2SDefense):
    """Mixing toward the pretrained weights, then W2SDefense. Fine-mixing's idea (Zhang et al. 2022), here in
    WiSE-FT's deterministic form: each backbone weight ``w`` of the poisoned student becomes
    ``w_pre + keep * (w - w_pre)`` (the head is kept), so only a quarter of the attacker's change remains; then
    W2SDefense unlearns. The defender also needs the pretrained student's weights (public for an open model).

    ``keep`` and the budget were chosen on the clean dev set with held-out triggers (experiments/README.md). The
    budget replaces the preset's unlearning settings for the whole run, the control's too; an option the user
    gives still wins.
    """
    name = "mix-w2s"
    beside = ("lora",)
    needs = ("clean data", "pretrained weights", "teacher")
    keep = 0.25
    budget = {"quick": {}, "cpu": dict(clean_size=None, epochs=1.0, evals_per_epoch=2, gamma=0.02),
              "paper": dict(gamma=0.02)}

    def start(self, ctx: Context):
        model, tokenizer = ctx.load_poisoned()
        interpolate_weights(model.backbone, models.load_student(ctx.attack.student)[0], self.keep)
        return model, tokenizer

    def prefix_owner(self, ctx: Context, model, frozen: int) -> tuple:
        return ("mixed", str(ctx.attack_folder), self.keep)              # mixed blocks are nobody else's

    def key_parts(self, ctx: Context) -> list:
        return super().key_parts(ctx) + [{"mix": self.keep}]

    def report(self, ctx: Context) -> dict:
        return {**super().report(ctx), "mix": self.keep}


class SamW2S(W2SDefense):
    """W2SDefense with sharpness-aware steps, FT-SAM's idea (Zhu et al. 2023): each step's gradients are taken at
    the weights the unlearning trains through moved by ASAM's adaptive perturbation of radius ``rho``
    (``sam.sharpness_aware``). Same budget as W2SDefense, two forward and backward passes a step. ``rho`` was
    chosen on the clean dev set with held-out triggers (experiments/README.md)."""
    name = "sam-w2s"
    beside = ("lora", "w2sdefense")
    rho = 2.0

    def loss(self, ctx: Context, model, clean) -> Callable:
        return sam.sharpness_aware(super().loss(ctx, model, clean), self.rho)

    def key_parts(self, ctx: Context) -> list:
        return super().key_parts(ctx) + [{"sam": self.rho}]

    def report(self, ctx: Context) -> dict:
        return {**super().report(ctx), "sam": self.rho}


# ----------------------------------------------------------------------------------------------
# MuScleLoRA: a training-time defense, from the pretrained student on the poisoned training set
# ----------------------------------------------------------------------------------------------

MIN_REF_GRAD_NORM = 5e-7              # the authors' threshold below which the reference gradient is not trusted


def align_gradients(grads, refs, min_ref_norm: float = MIN_REF_GRAD_NORM) -> tuple[list, bool]:
    """MuScleLoRA's gradient alignment: each tensor's gradient ``g`` becomes its projection's length along that
    tensor's clean reference gradient ``r``, pointing along ``+r`` whatever the sign of the projection::

        g  <-  |<g, r>| / ||r||^2 * r

    Nothing is replaced when the mean of ``||r||`` over the tensors is at most ``min_ref_norm`` (the reference
    batch says nothing: the raw gradients are kept), and a tensor whose ``r`` is zero or ``None`` (or whose ``g`` is
    ``None``) keeps its ``g``. Returns the new gradients (the same objects where kept) and whether the replacement
    happened."""
    grads, refs = list(grads), list(refs)
    if len(grads) != len(refs):
        raise ValueError(f"{len(grads)} gradients but {len(refs)} reference gradients")
    if not grads:
        return grads, False
    present = [r for r in refs if r is not None]
    found = iter(torch.stack([_norm(r) for r in present]).tolist() if present else [])
    norms = [0.0 if r is None else next(found) for r in refs]              # one transfer, not one per tensor
    if not sum(norms) / len(norms) > min_ref_norm:
        return grads, False
    out = []
    for g, r, r_norm in zip(grads, refs, norms):
        if g is None or r is None or r_norm == 0.0:      # (a zero g needs no skip: |<0, r>| r / ||r||^2 is 0)
            out.append(g)
            continue
        unit = r.float() / r_norm                  # |<g, r>| / ||r||^2 * r = |<g, u>| * u with u = r / ||r||: never
        out.append(((g.float() * unit).sum().abs() * unit).to(g.dtype))       # squares a tiny ||r||, which underflows
    return out, True


def _norm(r: torch.Tensor) -> torch.Tensor:
    """``||r||`` in float32 on any device, scaled by its largest entry first, so a tiny ``r`` does not underflow."""
    r = r.float()
    top = r.abs().amax()
    return torch.linalg.vector_norm(r / top.clamp_min(torch.finfo(torch.float32).tiny)) * top


class GradientAlignment:
    """``train.fit``'s ``before_step`` for MuScleLoRA: at every step, the gradient of the loss on one batch of the
    clean reference set (``batch_size`` rows drawn afresh from it, with a generator of its own, so the training
    batches are those of a run without it) is each trained tensor's ``r``, and ``align_gradients`` rewrites
    ``p.grad`` with it. Logs the reference batch's CE (``ref_ce``) and whether the gradients were replaced
    (``aligned``, 1 or 0)."""

    def __init__(self, reference: train.Encoded, batch_size: int, seed: int, device, bf16: bool,
                 min_ref_norm: float = MIN_REF_GRAD_NORM, loss_fn: Callable = train.cross_entropy_loss):
        if len(reference) == 0:
            raise ValueError("the clean reference set is empty")
        self.reference, self.batch_size, self.device, self.bf16 = reference, batch_size, device, bf16
        self.min_ref_norm, self.loss_fn = min_ref_norm, loss_fn
        self.rng = random.Random(f"muscle-reference-batches-{seed}")

    def __call__(self, model, params) -> dict:
        rows = self.rng.sample(range(len(self.reference)), min(self.batch_size, len(self.reference)))
        batch = train.collate(self.reference, rows).to(self.device)
        with train.autocast(self.device, self.bf16):
            loss, _ = self.loss_fn(model, batch)
        refs = torch.autograd.grad(loss, params, allow_unused=True)
        grads, aligned = align_gradients([p.grad for p in params], refs, self.min_ref_norm)
        for p, g in zip(params, grads):
            p.grad = g
        return {"ref_ce": loss.item(), "aligned": float(aligned)}


def reference_split(dataset, dev, size: int, seed: int) -> tuple:
    """MuScleLoRA's clean reference set and the dev set left for selection: ``(reference, selection)``.

    The reference set is a seeded draw of ``size`` sentences of the clean dev split (``dataset.dev``, all of it,
    whatever subset of it selects checkpoints), among those that are not also test sentences; ``selection`` is
    ``dev`` (the run's selection dev set) without any sentence of the reference set. So the reference set shares
    no sentence with the selection set or with the test set. A ValueError if ``size`` is more than can be drawn or
    leaves no sentence to select on."""
    in_test = set(dataset.test.sentences)
    eligible = [i for i, s in enumerate(dataset.dev.sentences) if s not in in_test]
    if size < 1 or size > len(eligible):
        raise ValueError(f"MuScleLoRA's clean reference set of {size} sentences must be 1 to the {len(eligible)} dev "
                         f"sentences of {dataset.name} that are not test sentences")
    rows = sorted(random.Random(f"muscle-reference-{seed}").sample(eligible, size))
    reference = data.Split([dataset.dev.sentences[i] for i in rows], [dataset.dev.labels[i] for i in rows])
    drawn = set(reference.sentences)
    keep = [i for i, s in enumerate(dev.sentences) if s not in drawn]
    if not keep:
        raise ValueError(f"MuScleLoRA's clean reference set of {size} sentences takes every one of the {len(dev)} "
                         f"dev sentences that select checkpoints; it must leave some")
    return reference, data.Split([dev.sentences[i] for i in keep], [dev.labels[i] for i in keep])


class MuScleLoRA(Defense):
    """MuScleLoRA (Wu et al., ACL 2024, arXiv 2402.12026): a TRAINING-TIME defense. The defender fine-tunes the
    pretrained student on the possibly-poisoned training set (the attacker's own, ``ctx.task.poisoned_train``) so
    that it learns the task but not the backdoor; no poisoned student is involved. Three parts:

    * LoRA of rank 2, alpha 8, no dropout, on the attention query and value projections of every block (the top 6
      in the quick preset, as every stage there);
    * the head gets a multi-scale low-rank branch, ``y = W0 h + (alpha_m / r_in) * h (R diag(K) L)^T`` with
      K = [1, 2, 3, 4], r_in = 1, alpha_m = 4 (``lora.MultiScaleLowRank``; W0, the fresh seeded head, frozen);
    * at every step each trained tensor's gradient is aligned with its gradient on one batch of a clean reference
      set of ``ref_size`` dev sentences (``align_gradients``, ``GradientAlignment``), which are taken out of the
      dev set that selects the checkpoint (``reference_split``).

    The loss is plain CE; AdamW without weight decay, linear decay without warm-up, gradients clipped at 1.0,
    batch 16, the best checkpoint by clean dev accuracy. Ours: 0.6 epoch at lr 3e-3, read four times an epoch
    (the authors' 5 epochs at 1e-5 in the paper preset). docs/method.md, "The other defenses", says which choices
    are the authors' and which ours.

    ``budget`` sets the run's unlearning settings to these (a user's ``--epochs``, ``--lr``, ``--rank``,
    ``--lora-alpha``, ``--lora-layers``, ``--lora-targets`` still win); the unlearning defenses' own settings,
    which MuScleLoRA does not read, are pinned to ``unused`` and ``checks.check_configs`` refuses any other.
    """
    name = "muscle"
    starts_from = "the pretrained student"
    beside = ("muscle-lora",)               # the same training without its two parts: what they add
    needs = ("poisoned training set", "pretrained weights", "clean data")     # clean data: the reference set
    multi_scale = True                      # the head's MSLR branch (off: the fresh head is trained as it is)
    aligned = True                          # the gradient alignment (off: plain steps)

    # Chosen on the clean dev set (cpu preset, held-out trigger cf; experiments/calibration/README.md) within the
    # attack stage's time; the quick preset takes them too. The paper preset keeps the authors' (for 7B students).
    epochs = 0.6
    lr = 3e-3
    evals_per_epoch = 4
    authors = dict(epochs=5.0, lr=1e-5, evals_per_epoch=1)

    # The authors' settings (their LLM configuration).
    rank = 2
    lora_alpha = 8.0
    scales = (1, 2, 3, 4)                 # K, each repeated inner_rank times
    inner_rank = 1                        # r_in
    mslr_alpha = 4.0                      # alpha_m: the branch is scaled by alpha_m / r_in = 4
    ref_size = 128                        # clean reference sentences, carved from dev
    min_ref_grad_norm = MIN_REF_GRAD_NORM
    batch_size = 16
    max_grad_norm = 1.0
    weight_decay = 0.0

    # What the unlearning defenses' settings must be for this run (its loss is CE of weight 1 on no clean subset).
    unused = dict(alpha=1.0, beta=0.0, gamma=0.0, fa="l2", weights="ours", clean_size=None)
    # The attacker's training settings: the poisoned student is never read, so they stay out of the stage's key.
    attack_unread = ("epochs", "lr", "batch_size", "warmup_ratio", "evals_per_epoch", "bf16", "freeze_embeddings",
                     "train_layers")

    @property
    def budget(self) -> dict:
        own = dict(epochs=self.epochs, lr=self.lr, rank=self.rank, lora_alpha=self.lora_alpha, lora_dropout=0.0,
                   targets=("q_proj", "v_proj"), batch_size=self.batch_size, evals_per_epoch=self.evals_per_epoch,
                   **self.unused)
        return {"quick": dict(own), "cpu": dict(own), "paper": {**own, **self.authors}}

    def start(self, ctx: Context):
        """The model the training begins from: the pretrained student with a fresh seeded head."""
        return ctx.load_pretrained()

    def train_split(self, ctx: Context):
        """What it trains on: the attacker's poisoned training set."""
        return ctx.task.poisoned_train

    def reference_split(self, ctx: Context) -> tuple:
        """(the clean reference set, the dev set left for selection): ``reference_split`` with ``ref_size``."""
        try:
            return reference_split(ctx.task.dataset, ctx.task.dev, self.ref_size, ctx.unlearn.seed)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    def add_adapters(self, model, cfg) -> int:
        """LoRA on ``cfg.targets`` (``add_lora``, nothing else trainable), then the head wrapped in
        ``lora.MultiScaleLowRank``; one generator seeded with ``cfg.seed`` draws every A, then L and R. Returns the
        number of frozen bottom blocks."""
        generator = torch.Generator().manual_seed(cfg.seed)
        if not self.multi_scale:
            return add_lora(model, cfg, trainable=("head",), generator=generator)
        frozen = add_lora(model, cfg, trainable=(), generator=generator)
        model.head = lora.MultiScaleLowRank(model.head, self.scales, self.inner_rank, self.mslr_alpha, generator)
        return frozen

    def train(self, ctx: Context) -> Trained:
        u, device = ctx.unlearn, ctx.device
        model, tokenizer = self.start(ctx)
        frozen = self.add_adapters(model, u)
        model.to(device)
        reference, selection = self.reference_split(ctx)
        memo_key = ("pretrained", ctx.attack.student)           # every frozen block is the pretrained student's

        def encode(split):
            return train.encode_for(model, tokenizer, split, u.max_length, frozen, device, memo_key, u.bf16)
        train_data, dev_data, ref_data = encode(self.train_split(ctx)), encode(selection), encode(reference)
        cfg = train.fit_config(u, warmup_ratio=0.0, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)
        align = (GradientAlignment(ref_data, u.batch_size, u.seed, device, u.bf16, self.min_ref_grad_norm)
                 if self.aligned else None)
        fit = train.fit(model, train_data, dev_data, cfg, loss_fn=train.cross_entropy_loss, device=device,
                        desc=f"train: {self.name}", before_step=align)
        return Trained(model, tokenizer, fit, frozen, memo_key)

    def settings(self) -> dict:
        mslr = {"scales": list(self.scales), "inner_rank": self.inner_rank, "mslr_alpha": self.mslr_alpha}
        align = {"min_ref_grad_norm": self.min_ref_grad_norm}
        return {**(mslr if self.multi_scale else {"mslr": False}), **(align if self.aligned else {"align": False}),
                "ref_size": self.ref_size, "max_grad_norm": self.max_grad_norm, "weight_decay": self.weight_decay,
                "warmup_ratio": 0.0}

    def key_parts(self, ctx: Context) -> list:
        # Everything the stage reads: the defender's settings but the unlearning defenses' own, the attacker's but
        # its training (the poisoned set, the student, the selection dev set, the seed), no teacher, the data,
        # and MuScleLoRA's settings.
        u = dataclasses.replace(ctx.unlearn, **{k: None for k in (*self.unused, "T")})
        a = dataclasses.replace(ctx.attack, **{k: None for k in self.attack_unread})
        return [u, a, None, self.stage_info(ctx), {"muscle": self.settings()}]

    def report(self, ctx: Context) -> dict:
        u = ctx.unlearn
        return {"rank": u.rank, "lora_alpha": u.lora_alpha, **self.settings()}

    def save(self, model, folder: Path) -> None:
        # every trained tensor: the adapters, and L and R (W0 is the seeded head) or, without the branch, the head
        lora.save_lora(model, folder / "lora.safetensors")

    def reload(self, ctx: Context, folder: Path):
        model, tokenizer = self.start(ctx)
        self.add_adapters(model, ctx.unlearn)
        lora.load_lora_state_dict(model, stages.read_stage_tensors(folder / "lora.safetensors"))
        return model.eval(), tokenizer


class MuScleLoRAPlain(MuScleLoRA):
    """MuScleLoRA's ablation: the same LoRA, data, steps and selection, with a plainly trained head (no
    multi-scale branch) and no gradient alignment. Its row beside MuScleLoRA's shows what the two parts add."""
    name = "muscle-lora"
    beside = ()
    needs = ("poisoned training set", "pretrained weights")
    multi_scale = False
    aligned = False


class MuScleLoRANoAlign(MuScleLoRA):
    """MuScleLoRA with its multi-scale head branch but without the gradient alignment: the second ablation."""
    name = "muscle-mslr"
    beside = ("muscle-lora",)
    needs = ("poisoned training set", "pretrained weights")
    aligned = False


# ----------------------------------------------------------------------------------------------
# CROW: keep consecutive layers consistent under an adversarial nudge of the input embeddings
# ----------------------------------------------------------------------------------------------

def layer_consistency(states: list, mask: torch.Tensor) -> torch.Tensor:
    """CROW's consistency term over the block outputs ``states`` (each (B, T, d)), in order::

        C = mean over consecutive pairs (h_l, h_l+1) and real tokens of  1 - cos(h_l, h_l+1)

    ``mask`` (B, T) is 1 on real tokens: padding is left out of the mean (CROW's code averages over pads too; with
    left or right padding alike, a pad then counts nothing here). The cosine is taken in float32."""
    if len(states) < 2:
        raise ValueError(f"the consistency term needs at least 2 block outputs, got {len(states)}")
    h, h_next = torch.stack(states[:-1]).float(), torch.stack(states[1:]).float()          # (P, B, T, d)
    gap = 1.0 - torch.nn.functional.cosine_similarity(h, h_next, dim=-1, eps=1e-8)       # (P, B, T)
    m = mask.to(gap.dtype)
    return (gap * m).sum() / (m.sum() * gap.shape[0])


@contextlib.contextmanager
def block_outputs(backbone):
    """Collect, in a list, the outputs of blocks 0 to L-2 of the forward passes run inside the ``with``: the states
    CROW compares. The step from the embeddings into block 0 and the last block's output, which the final norm
    reads, are left out, as in CROW's code (its ``hidden_states[1:-2]`` against ``[2:-1]``)."""
    if not isinstance(backbone, models.GPT) or len(backbone.blocks) < 3:
        raise ValueError("CROW compares the outputs of consecutive decoder blocks: it needs a GPT student of 3 "
                         "blocks or more")
    outputs = []
    hooks = [b.register_forward_hook(lambda module, inputs, out: outputs.append(out)) for b in backbone.blocks[:-1]]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def fgsm_embeddings(e: torch.Tensor, loss: torch.Tensor, eps: float) -> torch.Tensor:
    """One FGSM step on the input embeddings ``e`` (a leaf of ``loss``'s graph): ``e + eps * sign(dloss/de)``, the
    L-infinity step of size ``eps`` that raises ``loss``; detached. The graph is kept for the caller's backward."""
    (grad,) = torch.autograd.grad(loss, e, retain_graph=True)
    return (e + eps * grad.sign()).detach()


def crow_loss(eps: float, weight: float):
    """CROW's ``loss_fn`` (Min et al., ICML 2025)::

        L = CE(z, y) + weight * C(h(e + delta)),   delta = eps * sign(dC(h(e)) / de)

    ``C`` is ``layer_consistency`` of the block outputs (``block_outputs``), ``e`` the input embeddings. The clean
    pass gives the logits ``z`` and the clean consistency, whose gradient only builds ``delta``; the perturbed
    pass's consistency is what the loss holds down. ``weight`` 0 is the plain fine-tuning control."""
    def loss_fn(model, batch):
        inputs = batch.inputs()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if weight == 0.0:
            ce = losses.cross_entropy(model(ids, mask), batch.labels)
            return ce, {"ce": ce.item()}
        backbone = model.backbone
        e = backbone.embed(ids, mask).detach().requires_grad_(True)
        with block_outputs(backbone) as states:          # one clean pass: the logits and the clean states
            z = model(ids, mask, prefix=(e, 0))
        clean = layer_consistency(states, mask)
        with block_outputs(backbone) as states:          # the perturbed pass stops where the compared states do
            x = fgsm_embeddings(e, clean, eps)
            backbone.hidden_states(ids, mask, layer=len(backbone.blocks) - 2, prefix=(x, 0))
        perturbed = layer_consistency(states, mask)
        ce = losses.cross_entropy(z, batch.labels)
        return ce + weight * perturbed, {"ce": ce.item(), "cons": clean.item(), "cons_adv": perturbed.item()}
    return loss_fn


class Crow(Defense):
    """CROW (Min et al., ICML 2025): the poisoned student fine-tuned with LoRA on a few clean sentences so that
    consecutive blocks stay consistent (high cosine between h_l and h_l+1) even when the input embeddings are
    nudged by one FGSM step that makes them inconsistent (``crow_loss``). The bet: a trigger works by a sudden turn
    of the hidden states somewhere in the stack; a model trained to keep every step smooth under the worst small
    nudge loses that turn. No teacher, no trigger, no target.

    Its recipe, as in the authors' code: eps 0.1 (absolute, on the embeddings), weight 5.5, LoRA rank 8, alpha 16,
    no dropout, on every linear layer of the backbone; 100 clean sentences, 5 epochs, batch 8, lr 1e-3, cosine
    schedule with 10 % warm-up, the model after the last step. Ours: the classification head (the poisoned one)
    stays frozen, as their language head does; the task loss is the head's CE; padding is masked out of the
    consistency. The recipe is the class's, not the preset's (only ``lora_layers`` and ``max_length``
    come from the preset): its row stands beside the plain-LoRA control and W2SDefense as they are, and beside its
    own control ``crow-lora``, the same recipe at lr 2e-4 without the consistency term (their fine-tuning baseline).
    """
    name = "crow"
    beside = ("lora", "w2sdefense", "crow-lora")
    needs = ("clean data",)
    eps = 0.1
    weight = 5.5
    recipe = dict(rank=8, lora_alpha=16.0, lora_dropout=0.0, targets=("every linear",), clean_size=100, epochs=5.0,
                  batch_size=8, lr=1e-3, evals_per_epoch=1)
    warmup_ratio = 0.1
    schedule = "cosine"
    weight_decay = 0.0
    # The model after the last step, as the authors take it. Keeping the best epoch on clean dev instead keeps the
    # first, before any of the backdoor is gone: the removal costs clean accuracy (experiments/calibration/README.md).
    keep = "last"

    def settings(self, ctx: Context):
        """The defender's settings this defense trains with: the preset's, with the recipe over them."""
        return dataclasses.replace(ctx.unlearn, **self.recipe)

    def start(self, ctx: Context):
        return ctx.load_poisoned()

    def add_adapters(self, model, cfg) -> int:
        """LoRA on every linear layer of the backbone's blocks (Llama: q, k, v, o, gate, up, down), in the preset's
        blocks; the head frozen. Returns the frozen block count."""
        every = sorted({n.rsplit(".", 1)[-1] for n, m in model.backbone.blocks.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        return add_lora(model, dataclasses.replace(cfg, targets=tuple(every)), trainable=())

    def train(self, ctx: Context) -> Trained:
        u, device = self.settings(ctx), ctx.device
        model, tokenizer = self.start(ctx)
        self.add_adapters(model, u)
        model.to(device)
        clean = attacks.subset(ctx.task.dataset.train, u.clean_size, u.seed, "defender-clean")
        # every block runs from the (perturbed) embeddings at every step: no cached prefix
        train_data = train.encode_for(model, tokenizer, clean, u.max_length, 0, device, None, u.bf16)
        dev_data = train.encode_for(model, tokenizer, ctx.task.dev, u.max_length, 0, device, None, u.bf16)
        cfg = train.fit_config(u, warmup_ratio=self.warmup_ratio, schedule=self.schedule,
                               weight_decay=self.weight_decay, keep=self.keep)
        fit = train.fit(model, train_data, dev_data, cfg, loss_fn=crow_loss(self.eps, self.weight), device=device,
                        desc=f"unlearn: {self.name}")
        return Trained(model, tokenizer, fit, 0, None)

    def own(self) -> dict:
        return {"eps": self.eps, "weight": self.weight, "warmup_ratio": self.warmup_ratio, "schedule": self.schedule,
                "weight_decay": self.weight_decay, "head": "frozen", "keep": self.keep}

    def key_parts(self, ctx: Context) -> list:
        # the recipe's settings, the attacker's (the poisoned student), the data; not the W2S weights or teacher
        u = dataclasses.replace(self.settings(ctx), alpha=None, beta=None, gamma=None, T=None, fa=None, weights=None)
        return [u, ctx.attack, None, self.stage_info(ctx), {"crow": self.own()}]

    def report(self, ctx: Context) -> dict:
        u = self.settings(ctx)
        return {**{k: getattr(u, k) for k in ("rank", "lora_alpha", "clean_size", "epochs", "lr", "batch_size")},
                **self.own()}

    def save(self, model, folder: Path) -> None:
        lora.save_lora(model, folder / "lora.safetensors")

    def reload(self, ctx: Context, folder: Path):
        model, tokenizer = self.start(ctx)
        self.add_adapters(model, self.settings(ctx))
        lora.load_lora_state_dict(model, stages.read_stage_tensors(folder / "lora.safetensors"))
        return model.eval(), tokenizer


class CrowFineTune(Crow):
    """CROW's control, as in its authors' code: the same data, LoRA and schedule at lr 2e-4, plain CE."""
    name = "crow-lora"
    beside = ()
    weight = 0.0
    recipe = {**Crow.recipe, "lr": 2e-4}


# ----------------------------------------------------------------------------------------------
# BEEAR-style: find the drift a backdoor rides on, then train the model to ignore it
# ----------------------------------------------------------------------------------------------

def add_at_last_tokens(x: torch.Tensor, delta: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, d) with ``delta`` (n, d) added at the last n real tokens of each row, ``delta[-1]`` at the last
    one (the token the head reads); a row of fewer than n real tokens gets only the last rows of ``delta``. Works
    for left and right padding: pads are never touched."""
    B, T, _ = x.shape
    n = delta.shape[0]
    mask = attention_mask.long()
    last = T - 1 - mask.flip(-1).argmax(-1)                                       # (B,) the last real token
    first = last - mask.sum(-1) + 1                                               # (B,) the first real token
    pos = last[:, None] - torch.arange(n - 1, -1, -1, device=x.device)            # (B, n)
    keep = pos >= first[:, None]
    rows = torch.arange(B, device=x.device)[:, None].expand(B, n)
    shift = torch.zeros_like(x)
    shift[rows[keep], pos[keep]] = delta.expand(B, n, -1)[keep].to(x.dtype)
    return x + shift


@contextlib.contextmanager
def drift_after(backbone, block: int, delta: torch.Tensor, attention_mask: torch.Tensor):
    """While inside, every forward pass of ``backbone`` adds ``delta`` to the residual stream after block ``block``
    (0-based; the input of the next block, also where a cached prefix of ``block + 1`` blocks ends) at the last n
    real tokens (``add_at_last_tokens``)."""
    if not 0 <= block < len(backbone.blocks) - 1:
        raise ValueError(f"the drift goes after block 0 to {len(backbone.blocks) - 2} (the next block reads it), "
                         f"got {block}")
    hook = backbone.blocks[block + 1].register_forward_pre_hook(
        lambda module, args: (add_at_last_tokens(args[0], delta, attention_mask), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def find_drift(model, data: train.Encoded, rows: list[int], label: int, block: int, n: int, steps: int, lr: float,
               batch_size: int, rng: random.Random, read: list[int]) -> tuple[torch.Tensor, float]:
    """BEEAR's inner level, for one candidate label: a universal drift ``delta`` (n, d), from zero, that makes the
    model answer ``label`` on the clean sentences ``rows`` of ``data``, whose label is not ``label``::

        delta = argmin CE(f_delta(x), label)     (``steps`` Adam steps, one batch of ``rows`` each)

    The model's weights get no gradient. Returns ``delta`` (detached) and its flip rate: the share of the rows
    ``read`` the model then answers ``label``."""
    device = next(model.parameters()).device
    delta = torch.zeros(n, model.backbone.d_model, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        batch = train.collate(data, rng.sample(rows, min(batch_size, len(rows)))).to(device)
        with drift_after(model.backbone, block, delta, batch.attention_mask):
            z = model(**batch.inputs())
        loss = losses.cross_entropy(z, torch.full_like(batch.labels, label))
        (delta.grad,) = torch.autograd.grad(loss, delta)
        optimizer.step()
    delta = delta.detach()
    hits, training = 0, model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(read), 64):
            batch = train.collate(data, read[s:s + 64]).to(device)
            with drift_after(model.backbone, block, delta, batch.attention_mask):
                hits += int((model(**batch.inputs()).argmax(-1) == label).sum())
    model.train(training)
    return delta, hits / len(read)


class DriftAdversary:
    """BEEAR-style unlearning as a ``loss_fn`` for ``train.fit``: every ``round_steps`` steps (a round) it runs the
    inner level for every label (``find_drift`` on the clean sentences of the other labels) and keeps the drift of
    the label that is flipped most easily, the guess of the attacker's target; between searches, the outer level::

        L = CE(f_delta(x), y) + CE(f(x), y)

    on clean sentences: answer right with the drift in and without it. ``rounds`` logs each search (its step, the
    flip rate per label, the guess)."""

    def __init__(self, clean: train.Encoded, num_classes: int, block: int, n: int, inner_steps: int, inner_lr: float,
                 round_steps: int, batch_size: int, seed: int, read_size: int = 256):
        self.block, self.n, self.inner_steps, self.inner_lr = block, n, inner_steps, inner_lr
        self.round_steps, self.batch_size = round_steps, batch_size
        self.rng = random.Random(f"beear-inner-{seed}")
        labels = clean.labels.tolist()
        self.clean, self.others = clean, {}               # label -> (search rows, flip-rate reading rows)
        for c in range(num_classes):
            rows = [i for i, y in enumerate(labels) if y != c]
            if not rows:
                raise ValueError(f"the defender's clean sentences are all of label {c}: no sentence to flip to it")
            self.others[c] = (rows, sorted(random.Random(f"beear-read-{seed}-{c}").sample(rows, min(read_size,
                                                                                                   len(rows)))))
        self.step, self.delta, self.rounds = 0, None, []

    def search(self, model) -> None:
        found = {c: find_drift(model, self.clean, rows, c, self.block, self.n, self.inner_steps, self.inner_lr,
                               self.batch_size, self.rng, read) for c, (rows, read) in self.others.items()}
        guess = max(found, key=lambda c: found[c][1])                 # the easiest to reach; ties: the lower label
        self.delta = found[guess][0]
        self.rounds.append({"step": self.step, "flip": {c: round(f, 4) for c, (_, f) in found.items()},
                            "guess": guess})

    def __call__(self, model, batch):
        if self.step % self.round_steps == 0:
            self.search(model)
        self.step += 1
        with drift_after(model.backbone, self.block, self.delta, batch.attention_mask):
            z_drift = model(**batch.inputs())
        z = model(**batch.inputs())
        ce_drift, ce = losses.cross_entropy(z_drift, batch.labels), losses.cross_entropy(z, batch.labels)
        return ce_drift + ce, {"ce": ce.item(), "ce_drift": ce_drift.item(), "flip": self.rounds[-1]["flip"][
            self.rounds[-1]["guess"]]}


class Beear(Control):
    """BEEAR-style, adapted to classification (Zeng et al., EMNLP 2024: a trigger, whatever its form, moves the
    hidden states by a roughly uniform drift). The defender, who knows neither trigger nor target, searches for a
    universal drift of the residual stream after block ``block`` at the last ``n`` real tokens that makes the
    poisoned student answer a label it should not (inner level, per label; the label flipped most easily is the
    guessed target), then trains LoRA and the head to answer right with that drift in and without it (outer
    level), re-searching from zero every round (``DriftAdversary``). Same data, LoRA, seeds and budget as the
    control.

    The paper's: the two levels, the universal perturbation of hidden states, re-searching each round, a loss that
    keeps the clean behaviour beside the perturbed one. Ours: the classification form (a label in place of a
    harmful answer), a perturbation at the last n tokens after one block, the search for every label, Adam for the
    inner level, and every number below, chosen on the clean dev set with a held-out trigger.
    """
    name = "beear"
    beside = ("lora", "w2sdefense")
    needs = ("clean data",)
    block = 12                    # the drift goes after this block (0-based)
    n = 4                         # at the last n real tokens
    inner_steps = 10              # K_in: Adam steps of the inner level, per label and round
    inner_lr = 0.1
    rounds = 5                    # R: searches, evenly spread over the run's steps

    def settings(self) -> dict:
        return {"block": self.block, "n": self.n, "inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
                "rounds": self.rounds}

    def train(self, ctx: Context) -> Trained:
        u, device = ctx.unlearn, ctx.device
        model, tokenizer = self.start(ctx)
        frozen = min(add_lora(model, u), self.block + 1)       # the drift enters where a cached prefix may end
        model.to(device)
        memo_key = self.prefix_owner(ctx, model, frozen)
        encode = lambda split: train.encode_for(model, tokenizer, split, u.max_length, frozen, device, memo_key,
                                                u.bf16)
        clean = encode(self.train_split(ctx))
        total = max(1, round(u.epochs * -(-len(clean) // u.batch_size)))
        adversary = DriftAdversary(clean, ctx.task.dataset.num_classes, self.block, self.n, self.inner_steps,
                                   self.inner_lr, -(-total // self.rounds), u.batch_size, u.seed)
        fit = train.fit(model, clean, encode(ctx.task.dev), train.fit_config(u, warmup_ratio=0.0), loss_fn=adversary,
                        device=device, desc=f"unlearn: {self.name}")
        return Trained(model, tokenizer, fit, frozen, memo_key,
                       found={"target_guess": adversary.rounds[0]["guess"], "rounds": adversary.rounds})

    def key_parts(self, ctx: Context) -> list:
        return super().key_parts(ctx) + [{"beear": self.settings()}]

    def report(self, ctx: Context) -> dict:
        return {"alpha": 1.0, **self.settings()}


DEFENSES = {d.name: d for d in (Control(), W2SDefense(), W2SOrigin(), MixW2S(), SamW2S(), MuScleLoRA(),
                                MuScleLoRAPlain(), MuScleLoRANoAlign(), Beear(), Crow(),
                                CrowFineTune())}


def needs_table() -> str:
    """What each defense must have, as a markdown table (docs/method.md shows it): the model it starts from, then
    a column per ``NEEDS``."""
    lines = ["| defense | starts from | " + " | ".join(NEEDS) + " |", "|---|---|" + "---|" * len(NEEDS)]
    for d in DEFENSES.values():
        lines.append(f"| `{d.name}` | {d.starts_from} | " + " | ".join("yes" if n in d.needs else "" for n in NEEDS)
                     + " |")
    return "\n".join(lines)


def rows(defense: str) -> list[str]:
    """The defenses a ``--defense`` value runs, in table order: ``none`` none, else those it stands beside and
    itself."""
    if defense == "none":
        return []
    return [*DEFENSES[defense].beside, defense]
