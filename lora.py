"""Low-rank adaptation (LoRA) of frozen linear layers, written out by hand.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685), eq. 3:

    h = W0 x + ΔW x = W0 x + B A x,        B ∈ R^{d×r}, A ∈ R^{r×k}, r ≪ min(d, k)

with the update scaled by alpha / r (Section 4.1: "We then scale ΔW x by α/r"). A starts random and B starts
at zero, so at step 0 the wrapped layer computes exactly what the frozen layer did.

W2SDefense (step 3 of the pipeline) wraps the poisoned student's query and value projections with LoRA
(r = 512, alpha = 512, dropout 0.1), keeps the classification head fully trainable, freezes everything else,
and trains on clean data only. This module provides:

- `LoRALinear`: wraps (does not subclass) a frozen `nn.Linear`; `merge()` / `unmerge()` are explicit and
  safe to call twice.
- `inject_lora`: swaps named `nn.Linear` layers for wrappers and freezes the rest of the model.
- `merge_lora`, `unmerge_lora`, `lora_state_dict`, `load_lora_state_dict`, `save_lora`, `load_lora`,
  `count_trainable`, `lora_parameter_count`.
- `MultiScaleLowRank`: MuScleLoRA's multi-scale low-rank branch beside a frozen `nn.Linear` (the head, for
  `--defense muscle`).

Runtime imports: standard library and torch only. Saving to disk goes through `weights.py` (safetensors),
imported lazily inside `save_lora` / `load_lora`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

# The paper's code (microsoft/LoRA, loralib/layers.py) initialises A like nn.Linear does.
KAIMING_A = math.sqrt(5)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (Hu et al. 2021, eq. 3).

        y = W x + b + (alpha / r) · B A dropout(x)

    Shapes: `base.weight` W is (out, in), `A` is (r, in), `B` is (out, r).
    `A` ~ kaiming_uniform(a=sqrt(5)) drawn from `generator` if given; `B` = 0, so the wrapper starts as the base.
    `A` and `B` are float32 whatever the base dtype: outside autocast the update is computed in float32 and only
    the sum is cast; under bf16 autocast its two matmuls run in bf16 like every other one, while A, B, their
    gradients and the optimizer state stay float32 (master weights).

    Attributes: `base` (the wrapped layer, frozen), `A`, `B`, `r`, `alpha`, `scaling` = alpha / r,
    `dropout` (an `nn.Dropout` on the LoRA branch only; its rate is `dropout.p`), `merged`.

    Dropout uses torch's global RNG, as `nn.Dropout` does; seed it (`torch.manual_seed`) for repeatable training.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_rank_alpha(r, alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r  # alpha / r, NOT alpha (Hu et al. 2021, Section 4.1)
        self.dropout = nn.Dropout(dropout)
        self.merged = False

        # Drawn on the CPU so that the same generator seed gives the same A on every device.
        A = torch.empty(self.r, base.in_features, dtype=torch.float32)  # (r, in)
        nn.init.kaiming_uniform_(A, a=KAIMING_A, generator=generator)
        device = base.weight.device
        self.A = nn.Parameter(A.to(device))
        self.B = nn.Parameter(torch.zeros(base.out_features, self.r, dtype=torch.float32, device=device))  # (out, r)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B A, shape (out, in), float32. Used by merge/unmerge only, never in forward."""
        return (self.B @ self.A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:  # W already holds W0 + ΔW
            return y
        # Two thin matmuls, (..., in) -> (..., r) -> (..., out); the (out, in) matrix B A is never formed.
        h = self.dropout(x).to(self.A.dtype)  # (..., in), float32 (autocast, if on, casts the matmuls to bf16)
        update = (h @ self.A.T @ self.B.T) * self.scaling  # (..., out)
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) · B A in place; afterwards forward = base only. A second call does nothing."""
        if self.merged:
            return
        W = self.base.weight
        W.copy_((W.float() + self.delta_weight()).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) · B A, undoing `merge` (exact up to float rounding). A second call does nothing.

        Do not change A or B while merged: unmerge subtracts the CURRENT B A.
        """
        if not self.merged:
            return
        W = self.base.weight
        W.copy_((W.float() - self.delta_weight()).to(W.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class MultiScaleLowRank(nn.Module):
    """A frozen `nn.Linear` plus MuScleLoRA's multi-scale low-rank branch (MSLR; Wu et al., ACL 2024,
    arXiv 2402.12026):

        y = W0 x + b0 + (alpha / r_in) · x (R diag(K) L)^T

    K holds each of `scales` repeated `inner_rank` (r_in) times, so the branch is a sum of rank-r_in updates
    scaled by 1, 2, ..., each frequency band its own; `L` is (len(scales) · r_in, in), `R` is (out, len(scales) ·
    r_in), both kaiming-uniform (a = sqrt(5)) from `generator`: unlike LoRA's B = 0, the branch is NOT zero at
    step 0. Only `L` and `R` train; `base` (W0, b0) stays frozen. With one scale, K = [1], this is `LoRALinear`
    with A = L, B = R and no dropout.

    Where it sits: here on our student's single linear head, `Linear(576 -> C)`. The authors (their LLM
    setting) put it instead on the first layer of a two-layer head they add themselves, `576 -> 16` (no bias)
    -> dropout 0.1 -> `16 -> C` (no bias), both layers randomly initialised and frozen, so that MSLR's L and R
    are the head's only trainable weights; their K = [1, 2, 3, 4], r_in = 1, alpha = 4 (scaling 4).

    `L` and `R` are float32 whatever the base dtype, as `LoRALinear`'s A and B; `K` is a (non-saved) buffer.
    """

    def __init__(self, base: nn.Linear, scales=(1, 2, 3, 4), inner_rank: int = 1, alpha: float = 4.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiScaleLowRank wraps an nn.Linear, got {type(base).__name__}")
        _check_rank_alpha(inner_rank, alpha)
        scales = tuple(scales)
        if not scales or any(not k > 0 for k in scales):
            raise ValueError(f"MSLR scales must be positive numbers, at least one, got {scales!r}")
        self.base = base
        self.base.requires_grad_(False)
        self.scales = scales
        self.inner_rank = int(inner_rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.inner_rank          # alpha / r_in
        n = len(scales) * self.inner_rank
        device = base.weight.device
        K = torch.tensor([float(k) for k in scales for _ in range(self.inner_rank)], dtype=torch.float32)
        self.register_buffer("K", K.to(device), persistent=False)          # (n,): each scale r_in times
        L = torch.empty(n, base.in_features, dtype=torch.float32)          # (n, in)
        R = torch.empty(base.out_features, n, dtype=torch.float32)         # (out, n)
        nn.init.kaiming_uniform_(L, a=KAIMING_A, generator=generator)     # drawn on the CPU, L first
        nn.init.kaiming_uniform_(R, a=KAIMING_A, generator=generator)
        self.L = nn.Parameter(L.to(device))
        self.R = nn.Parameter(R.to(device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r_in) · R diag(K) L, shape (out, in), float32; never formed in forward."""
        return (self.R @ (self.K[:, None] * self.L)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                                    # (..., out)
        h = x.to(self.L.dtype)                                              # (..., in)
        update = ((h @ self.L.T) * self.K) @ self.R.T * self.scaling       # (..., n) -> (..., out)
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, inner_rank={self.inner_rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _check_rank_alpha(r: int, alpha: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield (qualified name, wrapper) for every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _matches_prefix(name: str, prefixes: Iterable[str]) -> bool:
    # "head" selects "head.weight" and "head.dense.bias", not "header.weight".
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def inject_lora(
    model: nn.Module,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    trainable: Iterable[str] = ("head",),
    within: Iterable[str] | None = None,
) -> list[str]:
    """Wrap every `nn.Linear` whose attribute name is in `targets` with `LoRALinear`, in place, and freeze the rest.

    Afterwards only the LoRA matrices A, B and the parameters whose qualified name starts with a prefix in
    `trainable` require grad. W2SDefense keeps the classification head ("head") fully trainable.
    `within` (qualified-name prefixes, e.g. the top blocks "backbone.blocks.27.") limits where LoRA goes.
    A is initialised in module order from `generator`, so one seed gives one set of A matrices.

    Returns the qualified names of the wrapped modules. Raises ValueError if no layer matches (listing the
    Linear layers that exist), if a `trainable` prefix selects no parameter, or if r / alpha are not positive.
    """
    _check_rank_alpha(r, alpha)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    already = [name for name, _ in lora_modules(model)]
    if already:
        raise ValueError(f"model already has LoRA wrappers at {already}; inject once per model")

    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [name for name in linear_names if name.rsplit(".", 1)[-1] in targets]
    if within is not None:
        within = (within,) if isinstance(within, str) else tuple(within)
        chosen = [name for name in chosen if name.startswith(within)]
    if not chosen:
        raise ValueError(
            f"no nn.Linear named any of {list(targets)}" + (f" within {list(within)}" if within else "")
            + f"; the model's Linear layers are: {linear_names}"
        )
    param_names = [name for name, _ in model.named_parameters()]
    for prefix in trainable:
        if not any(_matches_prefix(name, (prefix,)) for name in param_names):
            tops = sorted({name.split(".", 1)[0] for name in param_names})
            raise ValueError(
                f"trainable prefix {prefix!r} selects no parameter; top-level names are {tops} "
                "(pass trainable=() to train the LoRA matrices only)"
            )

    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout, generator))

    for name, p in model.named_parameters():
        p.requires_grad_(_matches_prefix(name, trainable))
    for _, module in lora_modules(model):
        module.A.requires_grad_(True)
        module.B.requires_grad_(True)
    return chosen


def _wrappers_or_raise(model: nn.Module) -> list[LoRALinear]:
    wrappers = [m for _, m in lora_modules(model)]
    if not wrappers:
        raise ValueError("model has no LoRALinear layers; call inject_lora(model, ...) first")
    return wrappers


def merge_lora(model: nn.Module) -> None:
    """Merge every wrapper: W <- W + (alpha / r) · B A. Safe to call twice."""
    for module in _wrappers_or_raise(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`: W <- W - (alpha / r) · B A. Safe to call twice."""
    for module in _wrappers_or_raise(model):
        module.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA A/B and the trainable head), by qualified name, detached copies.

    The frozen base weights are not included: the adapter is small and is applied to the same base model.
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into the model's trainable tensors. Strict: every key must exist with the same shape.

    Raises ValueError on missing or unknown keys, a shape mismatch, or a merged wrapper (unmerge first, since
    changing A/B while merged would leave the old update inside W).
    """
    merged = [name for name, m in lora_modules(model) if m.merged]
    if merged:
        raise ValueError(f"LoRA layers {merged} are merged; call unmerge_lora(model) before loading")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state_dict))
    unknown = sorted(set(state_dict) - set(params))
    if missing or unknown:
        raise ValueError(
            f"LoRA state dict does not match the model: missing keys {missing}, unknown keys {unknown} "
            "(was the model injected with the same targets and trainable prefixes?)"
        )
    for name, p in params.items():
        t = state_dict[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, model {tuple(p.shape)}")
    for name, p in params.items():
        p.copy_(state_dict[name].to(device=p.device, dtype=p.dtype))


def save_lora(model: nn.Module, path, metadata: dict[str, str] | None = None) -> None:
    """Write `lora_state_dict(model)` to a safetensors file via `weights.write_safetensors(path, tensors, metadata=...)`."""
    import weights  # lazy: weights.py sits beside this module and is only needed for disk I/O

    tensors = {name: t.contiguous() for name, t in lora_state_dict(model).items()}
    weights.write_safetensors(path, tensors, metadata=metadata)


def load_lora(model: nn.Module, path) -> None:
    """Read a file written by `save_lora` (via `weights.read_safetensors(path)`) and load it strictly."""
    import weights  # lazy, as in save_lora

    loaded = weights.read_safetensors(path)
    if isinstance(loaded, tuple):  # a reader that also returns the metadata: (tensors, metadata)
        loaded = loaded[0]
    load_lora_state_dict(model, loaded)


def count_trainable(model: nn.Module) -> int:
    """Number of scalars that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(in_features: int, out_features: int, r: int) -> int:
    """Trainable scalars one wrapper adds: A is (r, in) and B is (out, r), so r · (in + out)."""
    return r * (in_features + out_features)
