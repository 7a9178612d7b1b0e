"""The defenses ``w2s.py --defense`` offers: one class each, with what it computes in its docstring.

    Control     plain LoRA on clean data: alpha * CE                 the row every defense stands beside
    W2SDefense  alpha * CE + beta * T^2 * KL(p_t || p_s) + gamma * FA  the paper's method (arXiv 2410.14425)
    W2SOrigin   W2SDefense with FA pulled toward the origin          do the teacher's features matter?
    MixW2S      the backbone mixed back toward the pretrained one, then W2SDefense
    SamW2S      W2SDefense with sharpness-aware steps (sam.py)

The pipeline (``w2s.defense_stage``) runs every defense the same way::

    trained = defense.train(ctx)            # ctx: a Context, below; returns the model and its training log
    metrics = evaluate(trained.model, ...)  # CA, ASR and floor on the test sets, after defense.screen
    defense.save(trained.model, folder)     # what ``reload`` needs to rebuild the model

Adding a defense means one class here, registered in ``DEFENSES``, and one test file. The interface is meant for
more than today's unlearning defenses:

* a defense that trains on the poisoned training set from the pretrained student (MuScleLoRA) overrides ``start``
  (``ctx.load_pretrained``) and ``train_split`` (``ctx.task.poisoned_train``), or ``train`` whole;
* a defense that perturbs hidden states inside the model (BEEAR, CROW) overrides ``loss`` or ``train`` and hooks
  the blocks of ``model.backbone``;
* a test-time input filter (ONION) trains nothing and overrides ``screen``, which rewrites the sentences the model
  is tested on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import attacks
import lora
import losses
import models
import sam
import stages
import train

# What a defender may have; each defense's ``needs`` names some of these.
NEEDS = ("clean data", "pretrained weights", "poisoned training set", "teacher", "target label")

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


class Defense:
    """The interface. ``name`` is the ``--defense`` value and the row's label; ``beside`` the rows the table
    shows before it (the control first); ``needs`` what the defender must have (``NEEDS``); ``budget`` overrides
    of the unlearning settings, per preset, for this defense's whole run (its control's too: the same budget)."""
    name = ""
    beside: tuple = ("lora",)
    needs: tuple = ("clean data",)
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

def add_lora(model, cfg) -> int:
    """LoRA on the projections named by ``cfg.targets`` (the preset: attention query and value) of the top
    ``cfg.lora_layers`` blocks, or of all; the classification head stays fully trainable. Returns how many bottom
    blocks stay frozen."""
    frozen = train.frozen_blocks(model, cfg.lora_layers)
    present = {name.rsplit(".", 1)[-1] for name, m in model.backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [name for name in cfg.targets if name not in present]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not projections of this student; it has {sorted(present)}")
    lora.inject_lora(model, targets=tuple(cfg.targets), r=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     generator=torch.Generator().manual_seed(cfg.seed), trainable=("head",),
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
        return Defense.key_parts(self, ctx)

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


DEFENSES = {d.name: d for d in (Control(), W2SDefense(), W2SOrigin(), MixW2S(), SamW2S())}


def rows(defense: str) -> list[str]:
    """The defenses a ``--defense`` value runs, in table order: ``none`` none, else those it stands beside and
    itself."""
    if defense == "none":
        return []
    return [*DEFENSES[defense].beside, defense]
