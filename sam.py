"""Sharpness-aware unlearning: FT-SAM's idea (Zhu et al., ICCV 2023) on the weights the defender's LoRA trains
through, for ``w2s.py --defense sam-w2s``.

SAM (Foret et al. 2021) trains toward weights around which the loss is flat: each step first finds the
direction in which the loss rises fastest, moves the weights a little along it, and takes the step's gradients
there. FT-SAM found that fine-tuning a backdoored model this way on a little clean data removes much more of the
backdoor than plain fine-tuning, with ASAM's adaptive perturbation (Kwon et al. 2021), which moves each weight in
proportion to its own size:

    e = rho * |W|^2 * G / || |W| * G ||          (elementwise; the norm over every moved weight at once)

Here the moved weights are those the unlearning trains through, each LoRA-wrapped projection's effective weight
``W0 + dW`` and the head, and the update stays in the adapters and the head, as in W2SDefense. The perturbation
is added beside each layer's output (``x e^T``) rather than written into its weight: the frozen weights are held
in bf16 while training (``train.bf16_weights``), where a perturbation this small would round away. rho was chosen
on the clean dev set with held-out triggers (experiments/calibration/README.md, "Sharpness-aware unlearning").
"""

import contextlib

import torch
import torch.nn.functional as F

import lora


def adaptive_perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ASAM's ascent step (Kwon et al. 2021), as FT-SAM takes it: ``e = rho * T^2 G / ||T G||`` with ``T = |W|``
    elementwise and the norm over every tensor at once, so that ``||e / T|| = rho``: each weight moves in
    proportion to its own size (a weight at 0 does not move), along the loss's steepest ascent in those units.
    Zero where every gradient is zero."""
    scaled = [w.abs() * g for w, g in zip(weights, grads)]                     # T G
    norm = torch.sqrt(sum(t.pow(2).sum() for t in scaled))
    if norm == 0:
        return [torch.zeros_like(w) for w in weights]
    return [rho * w.abs() * t / norm for w, t in zip(weights, scaled)]        # T^2 G rho / ||T G||


def moved_layers(model) -> list[torch.nn.Module]:
    """The linear layers the unlearning trains through: each LoRA-wrapped projection (its effective weight
    ``W0 + dW``) and the head, when it is trained."""
    layers = [m for _, m in lora.lora_modules(model)]
    return layers + ([model.head] if model.head.weight.requires_grad else [])


def effective_weight(layer) -> torch.Tensor:
    """The float32 weight a linear layer applies: ``W0 + dW`` for a LoRA wrapper, its weight otherwise."""
    if isinstance(layer, lora.LoRALinear):
        return layer.base.weight.float() + layer.delta_weight()
    return layer.weight.float()


@contextlib.contextmanager
def added_weights(layers, extra: list[torch.Tensor]):
    """While open, each layer's output gains ``x e^T`` (its own ``e`` of ``extra``): the layer acts as if its weight
    were ``W + e``, without writing into W."""
    handles = [m.register_forward_hook(lambda mod, inputs, y, e=e: y + F.linear(inputs[0], e))
               for m, e in zip(layers, extra)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sharpness_aware(loss_fn, rho: float):
    """SAM's step on ``loss_fn`` (FT-SAM's idea; ``rho`` in ASAM's units): a first pass finds the gradient of the
    loss with respect to each moved layer's effective weight (through a zero ``e`` added beside it), a second pass
    returns the loss at ``W + adaptive_perturbation(W, G, rho)``, whose backward gives the adapters and the head
    the gradients of the perturbed point. Logged: "sharp", the perturbed loss less the unperturbed one."""
    def loss(model, batch):
        layers = moved_layers(model)
        with torch.no_grad():
            weights = [effective_weight(m) for m in layers]
        probes = [torch.zeros_like(w, requires_grad=True) for w in weights]
        with added_weights(layers, probes):
            base, _ = loss_fn(model, batch)
        grads = torch.autograd.grad(base, probes)
        with torch.no_grad():
            e = adaptive_perturbation(weights, [g.float() for g in grads], rho)
        with added_weights(layers, e):
            total, terms = loss_fn(model, batch)
        return total, {**terms, "sharp": total.item() - base.item()}
    return loss
