"""One training loop for every stage, and the metrics that judge a backdoor.

The same ``fit`` fine-tunes the attacker's student (all weights), the defender's teacher (all
weights) and the unlearning runs (LoRA + head): it trains whatever parameters have
``requires_grad``. Its pieces, in reading order:

* ``encode`` turns sentences into token ids once; ``batches`` groups them into length-bucketed,
  dynamically padded batches (sentences of similar length share a batch, so little compute is spent
  on padding);
* ``fit``: AdamW, linear warm-up then linear decay, gradient clipping, optional bf16 autocast, a
  tqdm bar with the running loss, and the best checkpoint chosen on CLEAN dev accuracy only, restored
  at the end (never select or stop on test ASR: docs/method.md, "Evaluation protocol");
* ``logits``, ``predict``, ``accuracy``, ``attack_success_rate``, ``confusion_matrix``, and ``evaluate``,
  which reads a model's row of the table: CA, ASR and the ASR's floor.

A loss function is pluggable: ``loss_fn(model, batch) -> (loss, {term: value})``, so W2SDefense adds its
distillation terms without a second loop. Every term is logged per step.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import weights


# ----------------------------------------------------------------------------------------------
# Data: ids once, batches per step
# ----------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """Token ids of a list of sentences (truncated, unpadded) with their labels."""
    ids: list[list[int]]
    labels: torch.Tensor                  # (N,) long
    pad_id: int
    padding_side: str = "right"
    # Optional frozen-prefix cache (``cache_prefix``): per row, the residual stream (len_i, d) after the
    # first ``prefix_layers`` blocks of the model, which are frozen, so every step can start above them.
    prefix: list[torch.Tensor] | None = None
    prefix_layers: int = 0

    def __len__(self):
        return len(self.ids)


@dataclass
class Batch:
    input_ids: torch.Tensor               # (B, T)
    attention_mask: torch.Tensor          # (B, T), 1 = real token
    labels: torch.Tensor                  # (B,)
    index: torch.Tensor                   # (B,) rows of the Encoded set, e.g. to look up cached teacher outputs
    prefix: tuple | None = None           # (states (B, T, d), k) from the frozen-prefix cache, or None

    def to(self, device):
        prefix = None if self.prefix is None else (self.prefix[0].to(device), self.prefix[1])
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.index)),
                     prefix=prefix)

    def inputs(self) -> dict:
        """Keyword arguments of a model's forward: ids, mask, and the cached prefix when there is one."""
        extra = {} if self.prefix is None else {"prefix": self.prefix}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **extra}


def encode(tokenizer, sentences, labels, max_length: int, padding_side: str = "right") -> Encoded:
    """Tokenize every sentence once (the tokenizer truncates to ``max_length``)."""
    if len(sentences) != len(labels):
        raise ValueError(f"{len(sentences)} sentences but {len(labels)} labels")
    ids, mask = tokenizer.encode_batch(list(sentences), max_length=max_length, padding_side="right")
    rows = [row[:n].tolist() for row, n in zip(ids, mask.sum(1).tolist())]
    if any(len(r) == 0 for r in rows):
        empty = next(i for i, r in enumerate(rows) if not r)
        raise ValueError(f"sentence {empty} ({sentences[empty]!r}) has no tokens; a classifier needs at least one")
    return Encoded(rows, torch.as_tensor(list(labels), dtype=torch.long), tokenizer.pad_id, padding_side)


def collate(data: Encoded, index: list[int]) -> Batch:
    """Pad the rows ``index`` of ``data`` to the longest of them (dynamic padding)."""
    T = max(len(data.ids[i]) for i in index)
    input_ids = torch.full((len(index), T), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), T), dtype=torch.long)
    for r, i in enumerate(index):
        row = data.ids[i]
        cols = slice(T - len(row), T) if data.padding_side == "left" else slice(0, len(row))
        input_ids[r, cols] = torch.tensor(row)
        mask[r, cols] = 1
    prefix = None
    if data.prefix is not None:                  # pad the cached states the same way (pad rows stay 0)
        states = torch.zeros(len(index), T, data.prefix[0].shape[-1], dtype=data.prefix[0].dtype)
        for r, i in enumerate(index):
            n = len(data.ids[i])
            if data.padding_side == "left":
                states[r, T - n:] = data.prefix[i]
            else:
                states[r, :n] = data.prefix[i]
        prefix = (states, data.prefix_layers)
    return Batch(input_ids, mask, data.labels[index], torch.tensor(index), prefix)


@torch.no_grad()
def cache_prefix(model, data: Encoded, layers: int, device="cpu", memo: dict | None = None, memo_key=None,
                 progress: bool = True, bf16: bool = False) -> Encoded:
    """``data`` with each row's residual stream after the first ``layers`` blocks of ``model`` (a decoder
    ``Classifier``), computed once. Valid only while those blocks stay frozen; then every later forward
    (``model(**batch.inputs())``) starts at block ``layers`` and gives the same result, ``layers`` blocks
    cheaper. ``layers = 0`` returns ``data`` unchanged. States are kept in float32 on the CPU. ``bf16``: compute
    them under bf16 autocast, as the forwards that will start from them (the residual stream itself stays float32).

    Each sentence is run alone, unpadded, so that its states depend on the sentence only. In a batch they would
    also depend on its batch-mates: the padded length and the number of rows change which matrix-product
    kernel runs, and so the rounding (experiments/prefix_invariance.py measures it): a run whose attack stage is
    cached would see the defender's sentences in other company than a first run does, and give other last digits.
    Alone is slower, and the same bits every time.

    ``memo``: a dict shared between calls whose models have the same first ``layers`` blocks (name them by
    ``memo_key``); a sentence seen before is looked up, not recomputed.
    """
    if layers <= 0:
        return data
    n_blocks = len(model.backbone.blocks)
    if layers >= n_blocks:
        raise ValueError(f"a frozen prefix of {layers} blocks leaves nothing to train (the model has {n_blocks})")
    memo = {} if memo is None else memo
    key = lambda i: (memo_key, layers, bf16, tuple(data.ids[i]))
    todo = [i for i in range(len(data)) if key(i) not in memo]
    was_training = model.training
    model.eval()
    with bf16_weights(model, enabled=bf16, frozen_only=False):
        for i in tqdm(todo, desc=f"frozen prefix ({layers} blocks)", leave=False,
                      disable=not progress or len(todo) < 500, dynamic_ncols=True):
            ids = torch.tensor([data.ids[i]], device=device)                          # (1, n): no padding
            with autocast(device, bf16):
                x = model.backbone.hidden_states(ids, layer=layers - 1)
            memo[key(i)] = x[0].float().cpu()
    model.train(was_training)
    return dataclasses.replace(data, prefix=[memo[key(i)] for i in range(len(data))], prefix_layers=layers)


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


def encode_for(model, tokenizer, split, max_length: int, frozen: int, device, memo_key=None,
               bf16: bool = False) -> Encoded:
    """Token ids of ``split`` (a ``data.Split``), plus the frozen-prefix cache when the bottom ``frozen`` blocks
    are frozen (``memo_key`` names whose bottom blocks they are: states are shared between models with the same
    key)."""
    enc = encode(tokenizer, split.sentences, split.labels, max_length)
    memo = PREFIX_MEMO if memo_key is not None else None
    return cache_prefix(model, enc, frozen, device, memo=memo, memo_key=memo_key, bf16=bf16)


def batches(data: Encoded, batch_size: int, shuffle: bool = False, rng: random.Random | None = None,
            bucket: int = 50):
    """Yield length-bucketed batches.

    Without shuffling: sorted by length (evaluation; order does not matter). With shuffling: shuffle,
    cut into pools of ``bucket * batch_size`` rows, sort each pool by length, cut it into batches,
    and shuffle the batches — random order, little padding.
    """
    order = list(range(len(data)))
    if not shuffle:
        order.sort(key=lambda i: len(data.ids[i]))
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    else:
        rng.shuffle(order)
        pool = bucket * batch_size
        groups = []
        for s in range(0, len(order), pool):
            chunk = sorted(order[s:s + pool], key=lambda i: len(data.ids[i]))
            groups += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(groups)
    for g in groups:
        yield collate(data, g)


# ----------------------------------------------------------------------------------------------
# Metrics
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


def native_bf16(device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 matrix products run natively on ``device``, so that bf16 autocast is FASTER than float32:
    a CUDA GPU that supports bf16, or a CPU with AVX-512 BF16 or AMX (read from ``cpuinfo``; False where it
    cannot be read, e.g. not on Linux). On a CPU without them bf16 is emulated and several times slower than
    float32 (measured: bench/RESULTS_load.md)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    try:
        with open(cpuinfo) as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device, bf16: bool):
    """bf16 autocast on the model's device (weights stay float32: master weights and LoRA in fp32)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


@contextmanager
def bf16_weights(model, enabled: bool = True, frozen_only: bool = True):
    """Hold the weights of ``model``'s linear layers in bf16 while the block runs; put the float32 tensors back after.

    Under bf16 autocast every matrix product first casts its float32 weight to bf16. Autocast keeps that cast for
    the rest of the step only for weights that require grad; a FROZEN weight is cast again at every call, so a
    LoRA step re-reads the whole float32 model and writes a bf16 copy of it on every forward. Casting once
    beforehand feeds the products the very same bf16 numbers (the same round-to-nearest conversion), so results
    are bit for bit those of plain autocast, without that traffic (bench/RESULTS.md). Only for code that runs
    under bf16 autocast: a float32 product with a bf16 weight is an error.

    ``frozen_only``: leave the weights that require grad alone (they are the optimizer's float32 master
    weights); ``False`` for inference, where nothing is updated. A weight shared with another kind of layer (a
    language-model head tied to the token embedding) is left alone, so the embedding lookup stays float32.
    The biases stay float32 (autocast casts them; they are small).
    """
    if not enabled:
        yield
        return
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    kept = []                                           # (parameter, its float32 tensor), to put back
    for m in model.modules():
        w = getattr(m, "weight", None) if isinstance(m, torch.nn.Linear) else None
        if w is None or w.dtype != torch.float32 or id(w) in shared or (frozen_only and w.requires_grad):
            continue
        kept.append((w, w.data))
        w.data = w.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for w, data in kept:
            w.data = data


def make_optimizer(params, lr: float, weight_decay: float, device):
    """AdamW, with torch's fused kernel where it has one (CPU and CUDA): one pass over each tensor instead of a
    handful, the same update up to float rounding (tests/test_train.py). ``transformers.Trainer`` uses the same
    kernel by default, so the benchmark against it gives both stacks this optimizer (bench/README.md)."""
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


@torch.inference_mode()
def logits(model, data: Encoded, batch_size: int = 64, bf16: bool = False, device=None) -> torch.Tensor:
    """The logits of every row of ``data``, (N, classes) float32, in the original order (under bf16 autocast
    they are computed in bf16; the cast to float32 is exact)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = None
    with bf16_weights(model, enabled=bf16, frozen_only=False):     # cast once per call, not once per batch
        for b in batches(data, batch_size):
            with autocast(device, bf16):
                z = model(**b.to(device).inputs())
            if out is None:
                out = torch.empty(len(data), z.shape[-1])
            out[b.index] = z.float().cpu()
    model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


def predict(model, data: Encoded, batch_size: int = 64, bf16: bool = False, device=None) -> torch.Tensor:
    """Predicted class of every row of ``data``, in the original order."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.long)
    return logits(model, data, batch_size, bf16, device).argmax(-1)


@torch.inference_mode()
def pooled_features(model, data: Encoded, batch_size: int = 64, device=None, bf16: bool = False) -> torch.Tensor:
    """The pooled feature ``h`` (what the head reads) of every row of ``data``, (N, d) float32, in the original
    order; ``bf16``: computed as ``predict`` computes it under bf16 autocast."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(data), model.feature_dim)
    with bf16_weights(model, enabled=bf16, frozen_only=False):
        for b in batches(data, batch_size):
            b = b.to(device)
            with autocast(device, bf16):
                out[b.index.cpu()] = model.features(b.input_ids, b.attention_mask, b.prefix).float().cpu()
    model.train(was_training)
    return out


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to the label: CA when computed on the clean test set."""
    return (preds == labels).float().mean().item() if len(labels) else float("nan")


def attack_success_rate(preds: torch.Tensor, true_labels: torch.Tensor, target: int) -> float:
    """ASR: among triggered samples whose TRUE label is not the target, the share predicted as the target.

    Not ``1 - accuracy`` (right only for two classes) and never counting target-label samples
    (docs/method.md, "Evaluation protocol").
    """
    keep = true_labels != target
    if not keep.any():
        raise ValueError("the ASR set holds no sample whose true label differs from the target")
    return (preds[keep] == target).float().mean().item()


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """``m[true][predicted]`` counts."""
    m = torch.zeros(num_classes, num_classes, dtype=torch.long)
    m.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    return m.tolist()


def evaluate(model, tokenizer, task, target: int, max_length: int, device, bf16: bool, frozen: int = 0,
             memo_key=None) -> dict:
    """CA on the clean test set, ASR on the triggered non-target test set, and the ASR's floor (the same
    non-target sentences without the trigger, called the target) of ``task`` (attacks.Task); read once per model.

    When the floor's sentences are all in the clean test set (``task.floor_in_test``), their answers are the
    CA pass's own, so the floor and the confusion matrix count the same answers; otherwise (a subset of the
    test set) they get a pass of their own."""
    clean = encode_for(model, tokenizer, task.test, max_length, frozen, device, memo_key, bf16)
    trig = encode_for(model, tokenizer, task.asr_test, max_length, frozen, device, memo_key, bf16)
    p_clean = predict(model, clean, device=device, bf16=bf16)
    p_trig = predict(model, trig, device=device, bf16=bf16)
    if task.floor_in_test is not None:
        rows = torch.tensor(task.floor_in_test, dtype=torch.long)
        p_untrig, y_untrig = p_clean[rows], clean.labels[rows]
    else:
        untrig = encode_for(model, tokenizer, task.asr_floor, max_length, frozen, device, memo_key, bf16)
        p_untrig, y_untrig = predict(model, untrig, device=device, bf16=bf16), untrig.labels
    return {"ca": accuracy(p_clean, clean.labels),
            "asr": attack_success_rate(p_trig, trig.labels, target),
            "asr_floor": attack_success_rate(p_untrig, y_untrig, target),
            "confusion": confusion_matrix(p_clean, clean.labels, task.dataset.num_classes),
            "n_test": len(clean), "n_asr": len(trig)}


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class FitConfig:
    """Optimisation settings shared by every stage."""
    epochs: float = 1.0             # fractional epochs allowed (e.g. 0.5)
    lr: float = 2e-5
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0       # share of steps with a linear warm-up, then decay to 0
    schedule: str = "linear"        # the decay after warm-up: "linear" or "cosine" (``SCHEDULES``)
    max_grad_norm: float = 1.0
    bf16: bool = False
    evals_per_epoch: int = 1        # clean-dev evaluations per epoch (the best one is kept); see ``fit``
    keep: str = "best"              # the checkpoint kept: the "best" on clean dev, or the "last" (no selection)
    seed: int = 0


def fit_config(cfg, **over) -> FitConfig:
    """The ``FitConfig`` of a stage's settings (any dataclass with some of its fields), ``over`` replacing some."""
    names = {f.name for f in dataclasses.fields(FitConfig)}
    return FitConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names}, **over)


def cross_entropy_loss(model, batch: Batch):
    """The plain task loss ``CE(z, y)``, the default ``loss_fn``."""
    z = model(**batch.inputs())
    ce = F.cross_entropy(z.float(), batch.labels)
    return ce, {"ce": ce.item()}


@dataclass
class FitResult:
    best_dev_acc: float
    best_step: int
    steps: int
    seconds: float
    history: list = field(default_factory=list)     # one dict per step: loss and every term
    dev_history: list = field(default_factory=list)  # (step, dev accuracy)


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: ``step / warmup`` while warming up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: the same warm-up, then half a cosine from 1 down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def fit(model, train_data: Encoded, dev_data: Encoded, cfg: FitConfig, loss_fn=cross_entropy_loss,
        device="cpu", desc: str = "train", progress: bool = True, on_eval=None, before_step=None,
        best_file=None) -> FitResult:
    """Train the parameters of ``model`` that require grad; keep and restore the best clean-dev state.

    The clean dev set is read every ``steps_per_epoch // evals_per_epoch`` steps and at the last step, earliest best
    kept. Where those steps do not divide the run, the last two readings can be a step apart: mix-w2s's one epoch
    of 433 steps at two an epoch reads at 216, 432 and 433 (the reported rows were made so; tests/test_train.py pins
    it). With ``cfg.keep == "last"`` the readings are only logged and the model is left as the last step made it
    (a recipe without selection, CROW's).

    ``on_eval(step)``, if given, is called after each clean-dev evaluation (the calibration script uses it to
    measure other dev sets along the way, with ``predict``); it must not train the model. With ``cfg.bf16`` the
    frozen linear weights are held in bf16 while the loop runs (``bf16_weights``), the hook included, so a
    forward pass in it must run under ``autocast(device, True)``, as ``predict(..., bf16=True)`` does.

    ``before_step(model, params)``, if given, is called at every step after ``loss.backward()`` and before the
    gradients are clipped: it may rewrite ``p.grad`` of the trained ``params`` (MuScleLoRA's gradient alignment,
    defenses.py), and may return a dict of numbers logged with the step's terms. The same bf16 rule holds for it.
    Without it the loop is unchanged.

    ``best_file``: keep the best checkpoint in this file (deleted at the end) instead of in memory. A full
    fine-tuning's checkpoint is a copy of every weight, as big as the model, held through the rest of the run; on
    disk it costs a write per new best and one read, and restores the same bits.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}: one of {', '.join(SCHEDULES)}")
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"keep is 'best' or 'last', got {cfg.keep!r}")
    schedule = SCHEDULES[cfg.schedule]
    torch.manual_seed(cfg.seed)                        # dropout (e.g. LoRA's) draws from the global RNG
    rng = random.Random(cfg.seed)                      # batch order
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, device)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))

    def snapshot():
        if best_file is None:
            return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if n in names_set}
        weights.write_safetensors(best_file, {n: p.detach() for n, p in model.named_parameters() if n in names_set})
        return best_file

    names_set = set(names)
    result = FitResult(best_dev_acc=-1.0, best_step=0, steps=total, seconds=0.0)
    best_state = None
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    step, running = 0, None
    with bf16_weights(model, enabled=cfg.bf16):        # frozen weights cast once, not at every product
        while step < total:
            for batch in batches(train_data, cfg.batch_size, shuffle=True, rng=rng):
                batch = batch.to(device)
                with autocast(device, cfg.bf16):
                    loss, terms = loss_fn(model, batch)
                loss.backward()
                if before_step is not None:
                    terms = {**terms, **(before_step(model, params) or {})}
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)      # free the gradients now: not held through the next forward
                scheduler.step()
                step += 1
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                result.history.append({"step": step, "loss": loss.item(), **terms})
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", **{k: f"{v:.4g}" for k, v in terms.items()})
                if step % eval_every == 0 or step == total:
                    acc = accuracy(predict(model, dev_data, device=device, bf16=cfg.bf16), dev_data.labels)
                    result.dev_history.append((step, acc))
                    if cfg.keep == "last" and step == total:
                        result.best_dev_acc, result.best_step = acc, step        # read, not chosen: nothing restored
                    elif cfg.keep == "best" and acc > result.best_dev_acc:
                        result.best_dev_acc, result.best_step, best_state = acc, step, snapshot()
                    if on_eval is not None:
                        on_eval(step)
                    model.train()
                if step >= total:
                    break
    bar.close()
    if best_state is not None:                         # restore the best clean-dev checkpoint
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names_set:                     # from the file one tensor at a time: no second model
                    p.copy_(best_state[n] if best_file is None else weights.read_safetensors(best_file, [n])[n])
        if best_file is not None:
            Path(best_file).unlink(missing_ok=True)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
