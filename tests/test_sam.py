"""sam.py: FT-SAM's sharpness-aware step, against values computed by hand and against a perturbed copy."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import defenses
import lora
import losses
import sam
import w2s
from test_models import tiny_classifier


def test_adaptive_perturbation_by_hand():
    # ASAM's step, e = rho T^2 G / ||T G||, T = |W|, the norm over both tensors: T G = [3, -8] and [1],
    # ||T G|| = sqrt(74); e = rho [1*3, 2*(-8)] / sqrt(74) and rho * 0.5 * 1 / sqrt(74). In units of each
    # weight (e / T) the step has norm rho; a zero gradient everywhere gives no step.
    w, g = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5]])], [torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0]])]
    e = sam.adaptive_perturbation(w, g, rho=2.0)
    assert torch.allclose(e[0], torch.tensor([[6.0, 32.0]]) / math.sqrt(74))       # |W|^2 G = [3, 16]
    assert torch.allclose(e[1], torch.tensor([[0.5]]) / math.sqrt(74) * 2.0)      # |W|^2 G = 0.5
    assert math.isclose(math.sqrt(sum(((x / wi.abs()) ** 2).sum().item() for x, wi in zip(e, w))), 2.0, rel_tol=1e-6)
    zero = sam.adaptive_perturbation(w, [torch.zeros(1, 2), torch.zeros(1, 1)], rho=2.0)
    assert all(torch.equal(z, torch.zeros_like(x)) for z, x in zip(zero, w))


def test_sharpness_aware_loss_takes_the_gradients_of_the_perturbed_weights_and_leaves_the_model_as_it_was():
    # The loss it returns, and the gradients its backward leaves on the adapters and the head, are those of a copy
    # of the model whose effective weights were set to W + e, e computed here from that copy's own gradients with
    # respect to each W0 (the same as W0 + dW's); the model's weights are untouched and no hook is left behind;
    # rho = 0 is the plain loss.
    clf = tiny_classifier("llama", n_layer=2, num_classes=2, seed=7)
    defenses.add_lora(clf, w2s.UnlearnConfig(rank=2, lora_alpha=4.0, lora_dropout=0.0))
    with torch.no_grad():
        for _, m in lora.lora_modules(clf):
            m.B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))      # a nonzero dW
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = SimpleNamespace(inputs=lambda: {"input_ids": ids, "attention_mask": mask}, labels=torch.tensor([0, 1]))
    plain = lambda model, b: (lambda ce: (ce, {"ce": ce.item()}))(losses.cross_entropy(model(**b.inputs()), b.labels))
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}

    ref = copy.deepcopy(clf)
    bases = [m.base.weight for _, m in lora.lora_modules(ref)] + [ref.head.weight]
    for w in bases:
        w.requires_grad_(True)
    clean = plain(ref, batch)[0]
    grads = torch.autograd.grad(clean, bases)
    with torch.no_grad():
        eff = [m.base.weight + m.delta_weight() for _, m in lora.lora_modules(ref)] + [ref.head.weight.clone()]
        t = [x.abs() * g for x, g in zip(eff, grads)]
        norm = math.sqrt(sum((u ** 2).sum().item() for u in t))
        for w, x, u in zip(bases, eff, t):
            w.add_(0.3 * x.abs() * u / norm)                                     # W0 + e, so W0 + dW + e
    moved = plain(ref, batch)[0]
    moved.backward()

    total, terms = sam.sharpness_aware(plain, 0.3)(clf, batch)
    assert total.item() == pytest.approx(moved.item(), rel=1e-5)
    assert terms["sharp"] == pytest.approx(moved.item() - clean.item(), rel=1e-4, abs=1e-7)
    assert terms["sharp"] > 0                                                   # an ascent step
    total.backward()
    ours, theirs = dict(clf.named_parameters()), dict(ref.named_parameters())
    trained = [n for n, p in ours.items() if p.requires_grad]
    assert trained and all(n.endswith((".A", ".B")) or n.startswith("head.") for n in trained)
    for n in trained:
        assert torch.allclose(ours[n].grad, theirs[n].grad, rtol=1e-4, atol=1e-6), n
    assert all(torch.equal(p, before[n]) for n, p in clf.named_parameters())
    assert not any(m._forward_hooks for m in clf.modules())
    again, _ = sam.sharpness_aware(plain, 0.0)(clf, batch)
    assert again.item() == pytest.approx(plain(clf, batch)[0].item(), rel=1e-6)
