"""The W2SDefense objective, one named function per term (docs/method.md, "The loss").

    L = alpha * CE(z_s, y) + beta * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + gamma * FA

with ``z_s``, ``z_t`` the student's and teacher's logits, ``h_s`` the student's pooled feature (the
final hidden state of the last real token: what its classifier reads) and ``h_t`` the teacher's
projected feature (``ReLU(W_p [CLS])``, already in the student's width).

Where we differ from the authors' public code, on purpose:
* FA is per example: each student feature is pulled toward ITS OWN example's teacher feature. The
  public code compares every token of every student row (padding included) with the teacher feature of
  the LAST example of the batch (a broadcast); that is a bug, not the method the paper describes.
* Because of that, the authors' weights (gamma = 0.001 ...) were tuned for a term of a different scale
  (a mean over all tokens of a 4096-wide state); our defaults are calibrated for ours (see w2s.py).
"""

import torch
import torch.nn.functional as F


def cross_entropy(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``CE(z_s, y) = -1/B * sum_i log softmax(z_s[i])[y_i]``, the task loss on clean labels."""
    return F.cross_entropy(z_s.float(), y)


def distillation_kl(z_s: torch.Tensor, z_t: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``, averaged over the batch (Hinton et al. 2015).

    The teacher is the target distribution: ``KL(p_t || p_s) = sum_c p_t[c] (log p_t[c] - log p_s[c])``.
    The ``T^2`` keeps the gradient's scale independent of the temperature.
    """
    log_p_s = F.log_softmax(z_s.float() / T, dim=-1)                  # (B, C)
    log_p_t = F.log_softmax(z_t.float() / T, dim=-1)                  # (B, C)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)                # (B,)
    return T * T * kl.mean()


def feature_alignment(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """``FA = 1/B * sum_i || h_t[i] - h_s[i] ||_2^2``: each example against its own teacher feature."""
    if h_s.shape != h_t.shape:
        raise ValueError(f"student feature {tuple(h_s.shape)} and teacher feature {tuple(h_t.shape)} differ; "
                         f"the teacher's projection must map to the student's width")
    return (h_t.float() - h_s.float()).pow(2).sum(-1).mean()


def feature_alignment_normalized(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """``FA_n = 1/B * sum_i || h_t[i]/||h_t[i]|| - h_s[i]/||h_s[i]|| ||_2^2 = 1/B * sum_i 2 (1 - cos(h_t[i], h_s[i]))``.

    The same per-example pull, on directions only. Why it exists: nothing ties the scale of the teacher's
    projected feature to the student's (the teacher is trained by CE alone, and the student's feature comes
    out of a final norm), so the plain FA can be almost all norm mismatch (measured on SmolLM2 + MiniLM:
    ``||h_s||^2`` about 2,000 against ``||h_t||^2`` about 100), i.e. "shrink the feature", not "point it the
    way the teacher does". ``FA_n`` lies in [0, 4] and keeps only the direction.
    """
    if h_s.shape != h_t.shape:
        raise ValueError(f"student feature {tuple(h_s.shape)} and teacher feature {tuple(h_t.shape)} differ; "
                         f"the teacher's projection must map to the student's width")
    u_s = F.normalize(h_s.float(), dim=-1, eps=1e-8)
    u_t = F.normalize(h_t.float(), dim=-1, eps=1e-8)
    return (u_t - u_s).pow(2).sum(-1).mean()


FEATURE_DISTANCES = {"l2": feature_alignment, "normalized": feature_alignment_normalized}


def w2s_loss(z_s, h_s, y, z_t, h_t, alpha: float, beta: float, gamma: float, T: float = 2.0, fa: str = "l2"):
    """``alpha * ce + beta * kd + gamma * fa``; returns the total and each unweighted term (for logging).

    A term whose weight is 0 is still reported but does not enter the graph, so the plain-LoRA control
    (beta = gamma = 0) computes exactly ``alpha * CE``. ``fa`` picks the feature distance: ``"l2"``
    (``feature_alignment``, the paper's) or ``"normalized"`` (``feature_alignment_normalized``).
    """
    ce = cross_entropy(z_s, y)
    kd = distillation_kl(z_s, z_t, T)
    fa = FEATURE_DISTANCES[fa](h_s, h_t)
    total = alpha * ce
    if beta:
        total = total + beta * kd
    if gamma:
        total = total + gamma * fa
    return total, {"ce": ce.item(), "kd": kd.item(), "fa": fa.item()}
