"""Choose W2SDefense's loss weights on the CLEAN dev set, against a trigger that no reported number uses.

    .venv/bin/python experiments/calibrate_w2s.py --preset quick --seed 0 --triggers cf \
        --grid '[{"defense": "none"}, {"defense": "lora"}, {}, {"gamma": 50}, {"fa": "l2", "gamma": 0.01}]'

The attacker's stage (BadNet with the held-out trigger, here `cf`) and the teacher come from the usual stage
cache. Each grid entry overrides fields of the preset's UnlearnConfig ("defense" picks w2sdefense (default),
lora or none); each is trained on the defender's clean subset, selected on clean dev accuracy as in w2s.py,
and then measured on the dev side only: CA on 300 clean dev sentences, ASR on 150 triggered non-target dev
sentences (``--dev-asr-size``: another number, or 'all'). The test set is never read. The syntactic attack is
measured on dev only in the direction whose dev sentences are paraphrased (`--attack syntactic --target 1`:
SST-2's SCPN dev file paraphrases negative sentences only, ``data.load_scpn_dev``); the reported syntactic rows
use target 0, so target 1 is a held-out syntactic attack. One JSON line per entry; a trained entry also gives
"dev_acc", the accuracy on the whole clean dev set of the checkpoint kept (what selected it: an upward-biased but
larger sample than the 300), beside the poisoned student's own ("poisoned_dev_acc", first line).

Levers that exist only here, as experiments, until one earns its place in w2s.py (experiments/calibration/README.md):
``"head": "fresh"`` re-initialises the classification head (seeded) before unlearning instead of keeping the
poisoned one, ``"head": "frozen"`` keeps the poisoned head and does not train it (only the LoRA moves);
``"fa_tokens": "all"`` pulls the final hidden state of EVERY real token of a sentence toward that
sentence's teacher feature (the mean over its tokens), not only the last token's (the pooled feature);
``"fa_block": k`` aligns the last real token's state after block k (0-based), read through the final norm as the
head would read it, instead of the final one (the head still reads the final state); ``"gamma_ramp": f`` raises
gamma linearly from 0 to its value over the first fraction f of the steps (weak first, then strong);
``"gamma_decay": g`` lowers gamma linearly from its value at the first step to g at the last (strong first, then
weak: pull the features hard while the backdoor is there, then let the cross-entropy restore clean accuracy);
``"fa_target": "zero"`` or ``"shuffled"`` replaces the teacher's features that the feature term pulls toward
(``feature_targets``), an ablation of the teacher: the origin (the term becomes ``||h_s||^2``, a pull that only
shrinks the feature), or the teacher's features of OTHER clean sentences (a seeded permutation: their scale and
spread, without the per-sentence match); ``"head_refit": n`` after unlearning re-trains the classification
head alone (backbone and LoRA frozen) for n full-batch AdamW steps of cross-entropy on the clean sentences'
pooled features, keeping the head with the best clean dev accuracy (``refit_head``); ``"splice": f`` inserts,
into a seeded share f of the defender's clean sentences, a span of 1 to 5 consecutive words of another of them
(``splice_spans``), keeping the label and, for W2SDefense, the unperturbed sentence's teacher logits and feature
as the targets: an insertion the defender makes up from clean data alone (not W2SDefense: an augmentation);
``"latent": {"block": b, "eps": e}`` adds BEEAR's idea (docs/method.md, "The other defenses") without its knowledge of the target:
one universal perturbation per true class, added to the residual stream after block b at every real token, grown
each step to raise that class's cross-entropy and kept within L2 norm e, while the student learns to keep its
labels under it (``latent_adversarial``; optional "weight", default alpha, and "step", default e / 4);
``"prune": {"blocks": k, "share": p}`` is fine-pruning (Liu et al., 2018) before the LoRA goes in: in each of the
top k blocks, the share p of MLP units that contribute least to the residual stream over the defender's clean
sentences (``mlp_contributions``) are removed (``prune_units``); with "defense" "none", the pruning alone;
``"mix": k`` moves every backbone weight back toward the pretrained student's before the LoRA goes in,
``w_pre + k * (w - w_pre)`` (``defenses.interpolate_weights``; Fine-mixing's idea, Zhang et al. 2022, in WiSE-FT's
deterministic form), the head kept: it assumes the defender has the pretrained weights, which W2SDefense does not;
``"fit_threshold": true`` after unlearning moves the decision on the margin ``z_1 - z_0`` to the threshold
that is most accurate on the clean dev sentences no reading uses (``threshold_rows``, classes weighted back to
the whole dev set's shares, ``fit_threshold``), and reports that reading too ("threshold"), beside the line's own;
``"mix_blocks": {"a-b": k_g, ...}`` (with "mix") gives the blocks a to b (0-based, inclusive) their own factor k_g
instead (``mix_by_group``; e.g. ``{"0-9": 0.0}`` sets the bottom ten blocks back to the pretrained ones and mixes
the rest by "mix"), after experiments/block_reset.py found where a trigger is carried;
``"anchor": w`` adds ``w * T^2 * KL(softmax(z_p / T) || softmax(z_s / T))`` to the loss, z_p the POISONED
student's own logits on the same clean sentence, computed once before any mixing or LoRA (``anchored``): the
student is held to answer the defender's clean sentences as the poisoned student did, which no trigger is in
(learning without forgetting's idea, Li & Hoiem 2016), meant to keep the poisoned student's class balance
through the clean fine-tune (screened with mix-w2s's line at w = 5, it did not: experiments/calibration/README.md);
``"fst": w`` is Feature Shift Tuning's idea (Min et al., 2023): the head is re-initialised (seeded, as "fresh"),
and ``w * <D(W), D(W_p)> / ||D(W_p)||^2`` is added to the loss, W the head's weights, W_p the POISONED head's and
D the rows less their mean row (``head_directions``: the part of the head that the softmax reads), while after
every optimizer step D(W) is scaled back into the ball of D(W_p)'s norm (``project_head``), so that the term can
only fall by turning the head away from the poisoned one's decision directions (``feature_shift``): the clean
sentences must then be separated along other directions of the feature than the poisoned head's (FST's bet: the
trigger pushes along those; screened at w = 5, it failed its gate: experiments/calibration/README.md);
``"sam": rho`` is FT-SAM's idea (Zhu et al., ICCV 2023: sharpness-aware fine-tuning removes more of a backdoor
than plain fine-tuning on the same clean data), on the weights this line's training moves: every step first
finds the gradient G of the loss with respect to each effective weight W (each LoRA-wrapped projection's
``W0 + dW`` and the head's), then takes the step's gradients at ``W + e``, ASAM's adaptive perturbation
``e = rho * |W|^2 * G / || |W| * G ||`` (Kwon et al. 2021; elementwise, the norm over all of them together), so
that the adapters are trained toward weights around which the clean loss is flat (sam.py; logged: "sharp", the
loss at ``W + e`` less the loss at W). FT-SAM fine-tunes every weight; the update here stays in the adapters and
the head, as in the preset. Screened at rho 0.5 and 2.0, rho 2.0 passed its gate and became ``w2s.py --defense
sam-w2s`` (experiments/calibration/README.md, "Sharpness-aware unlearning").

With --curve, the same two dev measures are also taken at every clean-dev evaluation during training (the
"curve" field: step, the full dev accuracy that selects checkpoints, dev CA, dev ASR), so that checkpoint rules
can be compared on dev without retraining.
"""

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attacks  # noqa: E402
import data  # noqa: E402
import defenses  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import sam as sharpness  # noqa: E402
import train  # noqa: E402
import w2s  # noqa: E402


def main(argv=None) -> None:
    parser = w2s.parser()
    parser.add_argument("--grid", required=True, type=grid_entries,
                        help="JSON list of objects: UnlearnConfig overrides and this script's levers")
    parser.add_argument("--curve", action="store_true", help="also measure dev CA and ASR at every evaluation")
    parser.add_argument("--dev-asr-size", type=dev_asr_size, default=DEV_ASR_SIZE,
                        help=f"non-target dev sentences the dev ASR and its floor read (default {DEV_ASR_SIZE}; "
                             "'all': every one the trigger reaches)")
    args = parser.parse_args(argv)
    grid = args.grid
    a, t, u, eval_size = w2s.resolve_configs(args)
    w2s.check_configs(a, t, u, "w2sdefense", args.data_dir)
    trigger = dev_trigger(a, args.data_dir, "calibrate_w2s.py")
    device = w2s.pick_device(args.device)
    stages = Path(args.stages)
    task = w2s.build_task(a, eval_size, args.data_dir)
    if task.dataset.num_classes != 2 and any(entry.get("fit_threshold") for entry in grid):
        raise ValueError("fit_threshold fits one threshold on the margin z_1 - z_0: two classes only")
    if any(entry.get("anchor") and (entry.get("defense") == "none" or "latent" in entry) for entry in grid):
        raise ValueError("anchor adds a term to an unlearning loss of one forward pass: not with defense 'none' "
                         "or with latent")
    if any(entry.get("sam") and entry.get("defense") == "none" for entry in grid):
        raise ValueError("sam shapes the unlearning's steps: with defense 'none' nothing is trained")
    if any(entry.get("sam") and "latent" in entry for entry in grid):
        raise ValueError("sam runs the loss twice a step; the latent perturbation ascends on each run: not together")
    if any(entry.get("sam", 0) < 0 for entry in grid):
        raise ValueError("sam is a perturbation's radius: it must be at least 0")
    if any(entry.get("fst") and ("head" in entry or entry.get("defense") == "none") for entry in grid):
        raise ValueError("fst re-initialises the head and trains it away from the poisoned one: not with 'head' "
                         "or with defense 'none'")
    attack_folder, poisoned = w2s.attack_stage(a, task, stages, device)
    teacher_folder, teacher = w2s.teacher_stage(t, task, poisoned["feature_dim"], stages, device)
    dev_floor, dev_asr = dev_pairs(task, trigger, a.target, args.dev_asr_size)
    dev_ca = dev_ca_set(task)
    trigger = {"badnet": {"triggers": a.triggers}, "insent": {"insent_sentence": a.insent_sentence},
               "syntactic": {"target": a.target}}[a.attack]
    print(json.dumps({"seed": a.seed, "attack": a.attack, **trigger, "dev_asr_rows": len(dev_asr),
                      "teacher_dev_acc": teacher["best_dev_acc"],
                      "poisoned_dev_acc": poisoned["best_dev_acc"]}), flush=True)
    for over in grid:
        over = dict(over)
        defense = over.pop("defense", "w2sdefense")
        head = over.pop("head", "keep")
        fa_tokens = over.pop("fa_tokens", "last")
        fa_block = over.pop("fa_block", None)
        gamma_ramp = over.pop("gamma_ramp", 0.0)
        gamma_decay = over.pop("gamma_decay", None)
        head_refit = over.pop("head_refit", 0)
        fa_target = over.pop("fa_target", "teacher")
        splice = over.pop("splice", 0.0)
        latent = over.pop("latent", None)
        prune = over.pop("prune", None)
        mix = over.pop("mix", None)
        mix_blocks = over.pop("mix_blocks", None)
        threshold = over.pop("fit_threshold", False)
        anchor = over.pop("anchor", 0.0)
        fst = over.pop("fst", 0.0)
        sam = over.pop("sam", 0.0)
        if mix_blocks is not None and mix is None:
            raise ValueError("mix_blocks sets some blocks' own mixing factor; it needs mix for the rest")
        cfg = dataclasses.replace(u, **over)
        if fa_target == "zero" and defenses.fa_distance(cfg) == "normalized":
            raise ValueError("fa_target 'zero' has no direction for the normalized feature distance; use fa 'l2'")
        start = time.perf_counter()
        clean = attacks.subset(task.dataset.train, cfg.clean_size, cfg.seed, "defender-clean")   # the defender's data
        model, tokenizer = w2s.load_poisoned(a, attack_folder, task.dataset.num_classes)
        z_p = None
        if anchor:                                    # the poisoned student's own answers, before it changes
            model.to(device)
            z_p = train.logits(model, train.encode_for(model, tokenizer, clean, cfg.max_length, 0, device,
                                                       None, cfg.bf16), device=device, bf16=cfg.bf16)
            model.to("cpu")                           # the mixing below works beside the pretrained one on the CPU
        if mix is not None:
            mix_by_group(model.backbone, models.load_student(a.student)[0], mix, mix_blocks or {})
        if prune is not None:
            prune_dormant(model, tokenizer, prune, clean, cfg, device)
        frozen = defenses.add_lora(model, cfg)
        w_p = model.head.weight.detach().clone()      # the poisoned head, before any lever changes it
        prepare_head(model, "fresh" if fst else head, cfg.seed)
        model.to(device)
        # what a defense is handed (defenses.Context), with this line's unlearning settings
        ctx = w2s.context(a, t, cfg, task, attack_folder, teacher_folder, device)
        memo_key = defenses.DEFENSES["w2sdefense"].prefix_owner(ctx, model, frozen)
        if mix is not None:                 # mixed bottom blocks are nobody else's: no sharing of their states
            memo_key = (*memo_key, "mix", mix, json.dumps(mix_blocks, sort_keys=True))
        enc = lambda split: train.encode_for(model, tokenizer, split, cfg.max_length, frozen, device, memo_key,
                                             cfg.bf16)
        e_ca, e_asr, e_floor = enc(dev_ca), enc(dev_asr), enc(dev_floor)

        def measure():
            ca = train.accuracy(train.predict(model, e_ca, device=device, bf16=cfg.bf16), e_ca.labels)
            asr = train.attack_success_rate(train.predict(model, e_asr, device=device, bf16=cfg.bf16), e_asr.labels,
                                             a.target)
            return ca, asr

        along = []                                    # (step, dev CA, dev ASR) at each evaluation, with --curve
        on_eval = (lambda step: along.append((step, *measure()))) if args.curve else None
        fit = None
        if defense != "none":
            al, be, ga = defenses.DEFENSES[defense].loss_weights(ctx)
            if defense == "lora":
                loss_fn = defenses.unlearning_loss(al, 0.0, 0.0, cfg.T)
            else:
                z_t, h_t = w2s.teacher_outputs(t, teacher_folder, clean.sentences, task.dataset.num_classes,
                                               model.feature_dim, cfg.max_length, device)
                h_t = feature_targets(h_t, fa_target, cfg.seed)
                loss_fn = defenses.unlearning_loss(al, be, ga, cfg.T, z_t, h_t, defenses.fa_distance(cfg))
                if fa_tokens == "all":
                    loss_fn = all_token_loss(al, be, ga, cfg.T, z_t, h_t)
                if fa_block is not None or gamma_ramp or gamma_decay is not None:
                    steps = round(cfg.epochs * -(-len(clean) // cfg.batch_size))
                    loss_fn = block_ramp_loss(al, be, ga, cfg.T, z_t, h_t, fa_block, round(gamma_ramp * steps),
                                              gamma_decay, steps)
            if latent is not None:
                if set(latent) - {"block", "eps", "weight", "step"}:
                    raise ValueError(f"latent takes block, eps, weight, step; got {sorted(latent)}")
                if latent["block"] < frozen:
                    raise ValueError(f"latent block {latent['block']} lies in the frozen prefix (blocks 0-{frozen - 1})")
                loss_fn = latent_adversarial(loss_fn, latent["block"], latent["eps"], latent.get("weight", al),
                                             latent.get("step", latent["eps"] / 4))
            if anchor:
                loss_fn = anchored(loss_fn, z_p, anchor, cfg.T)
            if fst:
                loss_fn = feature_shift(loss_fn, w_p.to(device), fst)
            if sam:                                   # outermost: the sharpness of the whole loss
                loss_fn = sharpness.sharpness_aware(loss_fn, sam)
            # Row i of the spliced set is clean sentence i with a span inserted (or unchanged): the targets
            # computed above, on the clean sentences, stay aligned by row.
            trained_on = splice_spans(clean, splice, cfg.seed) if splice else clean
            with projected_head(model.head, w_p.to(device), enabled=bool(fst)):
                fit = train.fit(model, enc(trained_on), enc(task.dev), train.fit_config(cfg, warmup_ratio=0.0),
                                loss_fn=loss_fn, device=device, progress=False, on_eval=on_eval)
            if head_refit:
                refit_head(model, enc(clean), enc(task.dev), head_refit, device, cfg.bf16)
        ca, asr = measure()
        floor = train.attack_success_rate(train.predict(model, e_floor, device=device, bf16=cfg.bf16), e_floor.labels,
                                          a.target)
        refit = {}
        if threshold:                                 # one more reading of the same student, its decision moved
            fit_rows = threshold_rows(task.dataset.dev, dev_ca, dev_floor)
            margin = lambda e: (lambda z: z[:, 1] - z[:, 0])(train.logits(model, e, device=device, bf16=cfg.bf16))
            weight = class_weights(torch.tensor(fit_rows.labels), task.dataset.dev.labels)
            e_fit = enc(fit_rows)
            tau = fit_threshold(margin(e_fit), e_fit.labels, weight)
            moved = lambda e: (margin(e) > tau).long()
            refit = {"threshold": {"tau": round(tau, 4), "fit_rows": len(fit_rows),
                                   "dev_ca": round(train.accuracy(moved(e_ca), e_ca.labels), 3),
                                   "dev_asr": round(train.attack_success_rate(moved(e_asr), e_asr.labels, a.target), 3),
                                   "dev_asr_floor": round(train.attack_success_rate(moved(e_floor), e_floor.labels,
                                                                                    a.target), 3)}}
        dev_acc = dict(fit.dev_history) if fit else {}
        curve = [[s, round(dev_acc[s], 4), round(c, 3), round(r, 3)] for s, c, r in along]
        if head != "keep":                            # report the experimental levers with the rest
            over["head"] = head
        if fa_tokens != "last":
            over["fa_tokens"] = fa_tokens
        if fa_block is not None:
            over["fa_block"] = fa_block
        if gamma_ramp:
            over["gamma_ramp"] = gamma_ramp
        if gamma_decay is not None:
            over["gamma_decay"] = gamma_decay
        if head_refit:
            over["head_refit"] = head_refit
        if fa_target != "teacher":
            over["fa_target"] = fa_target
        if splice:
            over["splice"] = splice
        if latent is not None:
            over["latent"] = latent
        if prune is not None:
            over["prune"] = prune
        if mix is not None:
            over["mix"] = mix
        if mix_blocks is not None:
            over["mix_blocks"] = mix_blocks
        if threshold:
            over["fit_threshold"] = True
        if anchor:
            over["anchor"] = anchor
        if fst:
            over["fst"] = fst
        if sam:
            over["sam"] = sam
        print(json.dumps({"defense": defense, "over": over, "dev_ca": round(ca, 3), "dev_asr": round(asr, 3),
                          "dev_asr_floor": round(floor, 3), **refit,
                          **({"dev_acc": round(fit.best_dev_acc, 4)} if fit else {}),
                          "best_step": fit.best_step if fit else 0, "steps": fit.steps if fit else 0,
                          "seconds": round(time.perf_counter() - start, 1),
                          **({"last25": {k: round(v, 4) for k, v in last_terms(fit.history).items()}} if fit else {}),
                          **({"curve": curve} if curve else {})}), flush=True)


def last_terms(history: list[dict], n: int = 25) -> dict:
    """Each logged loss term's mean over the last ``n`` steps of a run's per-step log (``FitResult.history``)."""
    tail = history[-n:]
    keys = [k for k in tail[0] if k != "step"] if tail else []
    return {k: sum(row[k] for row in tail) / len(tail) for k in keys}


def anchored(loss_fn, z_p_all, weight: float, T: float = 2.0):
    """``loss_fn`` plus ``weight * T^2 * KL(softmax(z_p / T) || softmax(z_s / T))`` (``losses.distillation_kl``
    with the poisoned student as the target distribution), ``z_p`` the poisoned student's logits on the same row
    (looked up by ``batch.index``) and ``z_s`` the head's output in ``loss_fn``'s own forward pass (read by a hook:
    no second pass). Logged as "anchor"."""
    def loss(model, batch):
        seen = []
        hook = model.head.register_forward_hook(lambda module, inputs, out: seen.append(out))
        try:
            total, terms = loss_fn(model, batch)
        finally:
            hook.remove()
        if len(seen) != 1:
            raise ValueError(f"anchor reads the head's output of one forward pass; the loss made {len(seen)}")
        z_s = seen[0]
        kl = losses.distillation_kl(z_s, z_p_all[batch.index.cpu()].to(z_s.device), T)
        return total + weight * kl, {**terms, "anchor": kl.item()}
    return loss


def head_directions(w: torch.Tensor) -> torch.Tensor:
    """A linear head's rows less their mean row, ``D(W) = W - mean_c W_c``: adding one vector to every row adds
    the same number to every logit and changes no probability, so D(W) is all of the head that the softmax reads
    (for two classes, plus and minus half of ``W_1 - W_0``)."""
    return w - w.mean(dim=0, keepdim=True)


def fst_penalty(w: torch.Tensor, w_p: torch.Tensor) -> torch.Tensor:
    """Feature Shift Tuning's term (Min et al., 2023) on the decision directions: ``<D(W), D(W_p)> / ||D(W_p)||^2``
    (Frobenius inner product and norm), W the head being trained and W_p the poisoned one. Within the ball
    ``||D(W)|| <= ||D(W_p)||`` (``project_head``) it lies in [-1, 1]: 1 for the poisoned head, 0 for a head whose
    directions are orthogonal to it. FST's own term is ``<W, W_p>``, under a bound on W's norm; we take the
    directions because the rows' common part decides nothing, and we divide so the weight does not depend on the
    head's scale."""
    d_p = head_directions(w_p)
    return (head_directions(w) * d_p).sum() / d_p.pow(2).sum()


def project_head(w: torch.Tensor, w_p: torch.Tensor) -> None:
    """In place: if ``||D(W)|| > ||D(W_p)||``, scale D(W) down to that norm and keep the mean row
    (FST bounds the head's norm; ours is that bound, on the directions as ``fst_penalty`` reads them)."""
    with torch.no_grad():
        d = head_directions(w)
        n, c = d.norm(), head_directions(w_p).norm()
        if n > c:
            w.sub_(d * (1.0 - c / n))


def feature_shift(loss_fn, w_p: torch.Tensor, weight: float):
    """``loss_fn`` plus ``weight * fst_penalty(head, W_p)``, logged as "fst". The head must have been
    re-initialised, and ``projected_head`` must hold it in the ball while training."""
    def loss(model, batch):
        total, terms = loss_fn(model, batch)
        p = fst_penalty(model.head.weight, w_p)
        return total + weight * p, {**terms, "fst": p.item()}
    return loss


@contextlib.contextmanager
def projected_head(head, w_p: torch.Tensor, enabled: bool = True):
    """While open, every optimizer step is followed by ``project_head(head.weight, w_p)`` (a step hook on every
    optimizer: train.fit makes its own), so each clean-dev evaluation and each kept checkpoint sees a head in
    the ball."""
    if not enabled:
        yield
        return
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: project_head(head.weight, w_p))
    try:
        project_head(head.weight, w_p)
        yield
    finally:
        handle.remove()


def block_range(group: str, n_blocks: int) -> list[int]:
    """``"a-b"`` -> [a, ..., b]: a group of blocks, 0-based and inclusive, checked against the student's ``n_blocks``."""
    try:
        lo, hi = (int(x) for x in group.split("-"))
    except ValueError:
        raise ValueError(f"block group {group!r} is not 'a-b' (0-based, inclusive)") from None
    if not 0 <= lo <= hi < n_blocks:
        raise ValueError(f"block group {group!r} is outside the blocks 0-{n_blocks - 1}")
    return list(range(lo, hi + 1))


def mix_by_group(backbone, pretrained, keep: float, groups: dict) -> None:
    """``defenses.interpolate_weights`` with a factor per group of blocks: block b becomes
    ``w_pre + k_b (w - w_pre)``, k_b the factor of the group ``"a-b"`` (0-based, inclusive) that holds b, ``keep``
    for the blocks of no group and for everything outside the blocks (embeddings, final norm). In place; with no
    groups it is ``interpolate_weights(backbone, pretrained, keep)`` to the bit."""
    n = len(backbone.blocks)
    if len(pretrained.blocks) != n:
        raise ValueError("mix_by_group needs two backbones of the same architecture")
    for k in (keep, *groups.values()):                 # every factor checked before anything moves
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"mix factors must be in [0, 1], got {k}")
    own = {}
    for group, k in groups.items():
        blocks = block_range(group, n)
        if own.keys() & set(blocks):
            raise ValueError(f"block group {group!r} overlaps another group")
        own.update({b: float(k) for b in blocks})
    for b, block in enumerate(backbone.blocks):
        defenses.interpolate_weights(block, pretrained.blocks[b], own.get(b, keep))
    ref = dict(pretrained.named_parameters())
    with torch.no_grad():
        for name, w in backbone.named_parameters():
            if not name.startswith("blocks."):
                w.copy_(keep * w + (1.0 - keep) * ref[name].to(w))        # interpolate_weights' own expression


def prepare_head(model, head: str, seed: int) -> None:
    """The head lever: ``"keep"`` the poisoned head, trained (w2s.py); ``"fresh"`` a seeded new one, trained;
    ``"frozen"`` the poisoned head, not trained (only the LoRA moves)."""
    if head not in ("keep", "fresh", "frozen"):
        raise ValueError(f"unknown head {head!r}; choose one of keep, fresh, frozen")
    if head == "fresh":
        model.reset_head(torch.Generator().manual_seed(seed))
    if head == "frozen":
        model.head.requires_grad_(False)


def dev_ca_set(task: attacks.Task) -> data.Split:
    """The 300 clean dev sentences (seeded) on which the dev CA is measured."""
    return attacks.subset(task.dataset.dev, 300, 0, "dev-ca")


def refuse_syntactic(attack: str, script: str) -> None:
    """The diagnostics that call this study an inserted trigger (how far the word or sentence moves the
    feature); the syntactic attack has none to insert. Refused before any training."""
    if attack == "syntactic":
        raise SystemExit(f"{script}: measures an inserted trigger; the syntactic attack is not supported here, "
                         "use badnet or insent")


def dev_trigger(a: w2s.AttackConfig, data_dir, script: str):
    """The trigger measured on dev: the attack's own for BadNet and InSent; for the syntactic attack the SCPN
    paraphrases of the non-target dev rows (``data.load_scpn_dev``: SST-2 with target 1, HiddenKiller's
    direction, since the dev file paraphrases only negative sentences). Refused before any training."""
    if a.attack != "syntactic":
        return attacks.make_triggers(a, data_dir)[0]
    try:
        return attacks.make_trigger("syntactic", paraphrases=data.load_scpn_dev(a.dataset, a.target, data_dir))
    except data.DataError as e:
        raise SystemExit(f"{script}: the syntactic attack has no triggered non-target dev sentences here: {e}")


DEV_ASR_SIZE = 150          # every screen up to 2026-12-06 read its dev ASR on 150 sentences


# The keys of a grid entry that are this script's levers (the module's docstring), not UnlearnConfig fields; the loop
# in main pops each of them.
LEVERS = ("defense", "head", "fa_tokens", "fa_block", "gamma_ramp", "gamma_decay", "head_refit", "fa_target", "splice",
          "latent", "prune", "mix", "mix_blocks", "fit_threshold", "anchor", "fst", "sam")
GRID_DEFENSES = ("w2sdefense", "lora", "none")


def grid_entries(text: str) -> list[dict]:
    """``--grid``: a JSON list of objects whose keys are levers of this script or fields of ``w2s.UnlearnConfig``.
    Checked when the command line is read: a typo would otherwise surface only after the attack and the teacher
    have trained."""
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(grid, list) or not grid or not all(isinstance(entry, dict) for entry in grid):
        raise argparse.ArgumentTypeError('a JSON list of one or more objects, e.g. \'[{}, {"gamma": 0.1}]\'')
    fields = {f.name for f in dataclasses.fields(w2s.UnlearnConfig)}
    for entry in grid:
        unknown = sorted(set(entry) - fields - set(LEVERS))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown key {', '.join(unknown)} in {json.dumps(entry)}: a key is a lever ({', '.join(LEVERS)}) "
                f"or a field of UnlearnConfig ({', '.join(sorted(fields))})")
        if entry.get("defense", "w2sdefense") not in GRID_DEFENSES:
            raise argparse.ArgumentTypeError(f"defense {entry['defense']!r} in {json.dumps(entry)}: choose one of "
                                             f"{', '.join(GRID_DEFENSES)}")
    return grid


def dev_asr_size(text: str) -> int | None:
    """``--dev-asr-size``: a positive count, or 'all' (None: every non-target dev sentence the trigger reaches)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive number of sentences or 'all', got {text!r}")
    return int(text)


def dev_pairs(task: attacks.Task, trigger, target: int,
              size: int | None = DEV_ASR_SIZE) -> tuple[data.Split, data.Split]:
    """``size`` non-target dev sentences without the trigger and the same ``size`` with it (None: all of them),
    drawn from the rows the trigger can reach (all of them for an inserted word or sentence; the paraphrased ones
    for the syntactic attack). The share of the first classified as the target is the floor of the dev ASR (a
    model with no backdoor left still errs on some). One sentence of 150 is 0.0067 of ASR; SST-2's dev set has
    444 non-target sentences for target 0, so ``None`` reads three times as many (a binomial standard deviation
    at 0.1 of 0.014 against 0.025)."""
    dev = task.dataset.dev
    triggered, untriggered = attacks.asr_pairs(dev, trigger, target, random.Random(7), missing="skip")
    # row for row, so the seeded draw picks the same sentences from both
    return attacks.subset(untriggered, size, 0, "dev-asr"), attacks.subset(triggered, size, 0, "dev-asr")


def all_token_loss(alpha, beta, gamma, T, z_t_all, h_t_all):
    """``alpha*CE + beta*KD + gamma*FA_all``, FA_all = 1/B sum_i mean_{real tokens j of i} ||h_t[i] - H_s[i, j]||^2:
    every token's final hidden state of sentence i is pulled toward sentence i's teacher feature."""
    def loss_fn(model, batch):
        inputs = batch.inputs()
        extra = {"prefix": inputs["prefix"]} if "prefix" in inputs else {}
        mask = inputs["attention_mask"]
        hidden = model.backbone.hidden_states(inputs["input_ids"], mask, **extra)      # (B, T, d)
        h_s = models.last_real_token(hidden, mask)                                       # (B, d)
        z_s = model.head(h_s)                                                            # (B, C)
        idx = batch.index.cpu()
        z_t, h_t = z_t_all[idx].to(z_s.device), h_t_all[idx].to(z_s.device)
        real = mask.float()                                                              # (B, T)
        per_token = (h_t.float()[:, None] - hidden.float()).pow(2).sum(-1)               # (B, T)
        fa = ((per_token * real).sum(-1) / real.sum(-1)).mean()
        # CE and KD as w2s.py weighs them (gamma 0: its pooled FA stays out), then this FA in its place
        total, terms = losses.w2s_loss(z_s, h_s, batch.labels, z_t, h_t, alpha, beta, 0.0, T)
        return total + gamma * fa, {**terms, "fa": fa.item()}
    return loss_fn


def block_ramp_loss(alpha, beta, gamma, T, z_t_all, h_t_all, block=None, ramp_steps=0, decay_to=None, steps=0):
    """``alpha*CE + beta*KD + gamma_t*FA(h_block, h_t)``: FA on ``norm_f(x_block)`` at the last real token, x_block
    the residual stream after block ``block`` (None: the pooled final feature, as w2s.py). At the t-th call
    (1-based; one call per optimizer step): ``gamma_t = gamma * min(1, t / ramp_steps)``; or, with ``decay_to``,
    ``gamma_t = gamma + (decay_to - gamma) * (t - 1) / (steps - 1)``, from gamma at the first step to decay_to at
    the last; ``gamma`` if neither is set."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        seen = {}
        hook = None
        if block is not None:
            hook = model.backbone.blocks[block].register_forward_hook(lambda m, i, out: seen.update(x=out))
        try:
            z_s, h_s = model(**batch.inputs(), return_features=True)
        finally:
            if hook is not None:
                hook.remove()
        if block is not None:
            h_s = models.last_real_token(model.backbone.norm_f(seen["x"]), batch.inputs()["attention_mask"])
        idx = batch.index.cpu()
        z_t, h_t = z_t_all[idx].to(z_s.device), h_t_all[idx].to(z_s.device)
        g = gamma
        if ramp_steps:
            g = gamma * min(1.0, calls[0] / ramp_steps)
        elif decay_to is not None:
            g = gamma + (decay_to - gamma) * min(1.0, (calls[0] - 1) / max(1, steps - 1))
        return losses.w2s_loss(z_s, h_s, batch.labels, z_t, h_t, alpha, beta, g, T)
    return loss_fn


def feature_targets(h_t: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """What the feature term pulls the student's pooled feature toward, row by row: ``"teacher"`` its own
    sentence's teacher feature (W2SDefense); ``"zero"`` the origin; ``"shuffled"`` the teacher feature of another
    clean sentence, ``h_t[perm]`` with a uniformly random permutation seeded by ``seed`` (so a row keeps its own
    with probability 1/N: about one row of the defender's 2,000)."""
    if kind == "teacher":
        return h_t
    if kind == "zero":
        return defenses.DEFENSES["w2s-origin"].feature_target(h_t)
    if kind == "shuffled":
        return h_t[torch.randperm(len(h_t), generator=torch.Generator().manual_seed(seed))]
    raise ValueError(f"unknown fa_target {kind!r}; choose one of teacher, zero, shuffled")


def latent_adversarial(loss_fn, block: int, eps: float, weight: float, step: float):
    """``loss_fn`` plus ``weight * CE(z(x; delta_y), y)``: a second forward pass of the batch with ``delta_y`` added
    to the residual stream after block ``block`` at every real token of a row of true label y.

    ``delta`` (C, d) is universal (one row per class, shared by every sentence and step) and persistent: before
    each step it takes a normalised gradient-ascent step on that cross-entropy,
    ``delta_c <- P(delta_c + step * g_c / ||g_c||)``, ``g_c`` the gradient the previous step's backward left on
    it and ``P`` the projection onto the L2 ball of radius ``eps``; rows of a class without sentences in the
    previous batch stay. So the adversary looks for the one shift of the latent state that moves each class
    off its label (what a trigger does to the non-target class, BEEAR's observation), and the student learns to
    keep its labels under that shift, on clean data and without knowing the target or the trigger."""
    delta = None

    def ascend():
        g = delta.grad
        with torch.no_grad():
            norm = g.norm(dim=-1, keepdim=True)
            delta.add_(step * g / norm.clamp_min(1e-12) * (norm > 0))
            delta.mul_(eps / delta.norm(dim=-1, keepdim=True).clamp_min(eps))      # onto the ball of radius eps
        delta.grad = None

    def wrapped(model, batch):
        nonlocal delta
        inputs = batch.inputs()
        if delta is None:
            delta = torch.zeros(model.num_classes, model.feature_dim, device=batch.labels.device, requires_grad=True)
        elif delta.grad is not None:
            ascend()
        total, terms = loss_fn(model, batch)
        real = inputs["attention_mask"][..., None]                                        # (B, T, 1)
        push = delta[batch.labels][:, None, :]                                            # (B, 1, d)
        hook = model.backbone.blocks[block].register_forward_hook(
            lambda m, i, x: x + (push * real).to(x.dtype))
        try:
            z_adv = model(**inputs)
        finally:
            hook.remove()
        adv = losses.cross_entropy(z_adv, batch.labels)
        return total + weight * adv, {**terms, "adv": adv.item(), "delta": delta.norm(dim=-1).max().item()}
    wrapped.delta = lambda: delta
    return wrapped


def mlp_contributions(model, data: train.Encoded, blocks, device, bf16: bool, batch_size: int = 64) -> dict:
    """{b: (d_ff,)} each MLP unit j's mean contribution to the residual stream in block ``b`` over every real
    token of ``data``: ``mean |a_j| * ||W_down[:, j]||``, ``a_j = silu(gate_j(x)) * up_j(x)`` the unit's activation
    (what the down projection reads) and ``W_down[:, j]`` the direction it writes."""
    mlps = [model.backbone.blocks[b].mlp for b in blocks]
    if any(m.style != "llama" for m in mlps):
        raise ValueError("mlp_contributions reads a SwiGLU MLP's down projection (Llama-style students)")
    sums = {b: torch.zeros(m.down_proj.in_features) for b, m in zip(blocks, mlps)}
    seen, tokens = {}, 0
    hooks = [m.down_proj.register_forward_hook(lambda mod, i, out, b=b: seen.update({b: i[0]}))
             for b, m in zip(blocks, mlps)]
    try:
        with torch.no_grad(), train.bf16_weights(model, enabled=bf16, frozen_only=False):
            for batch in train.batches(data, batch_size):
                batch = batch.to(device)
                with train.autocast(device, bf16):
                    model.backbone.hidden_states(batch.input_ids, batch.attention_mask)
                real = batch.attention_mask.bool()                                       # (B, T)
                tokens += int(real.sum())
                for b in blocks:
                    sums[b] += seen[b][real].float().abs().sum(0).cpu()                   # (d_ff,)
    finally:
        for hook in hooks:
            hook.remove()
    return {b: sums[b] / tokens * m.down_proj.weight.detach().float().norm(dim=0).cpu() for b, m in zip(blocks, mlps)}


def prune_units(model, scores: dict, share: float) -> dict:
    """In each block ``b`` of ``scores``, remove the ``round(share * d_ff)`` MLP units with the smallest score
    (ties to the lower index): their down-projection columns set to zero, so they write nothing. {b: indices}."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"prune share must be in [0, 1), got {share}")
    removed = {}
    for b, score in scores.items():
        idx = torch.argsort(score, stable=True)[:round(share * len(score))]
        weight = model.backbone.blocks[b].mlp.down_proj.weight                          # (d, d_ff)
        with torch.no_grad():
            weight[:, idx.to(weight.device)] = 0.0
        removed[b] = idx
    return removed


def prune_dormant(model, tokenizer, prune: dict, clean: data.Split, cfg, device) -> None:
    """The prune lever: score the MLP units of the top ``prune["blocks"]`` blocks on the defender's clean
    sentences, remove ``prune["share"]`` of each block's (before any LoRA; the pruned blocks must get LoRA, so
    no frozen-prefix cache holds their unpruned states)."""
    if set(prune) != {"blocks", "share"}:
        raise ValueError(f"prune takes blocks and share; got {sorted(prune)}")
    n = len(model.backbone.blocks)
    if not 1 <= prune["blocks"] <= n:
        raise ValueError(f"prune blocks must be in 1..{n}, got {prune['blocks']}")
    if cfg.lora_layers is not None and prune["blocks"] > cfg.lora_layers:
        raise ValueError(f"prune blocks {prune['blocks']} reach below the {cfg.lora_layers} blocks with LoRA")
    model.to(device).eval()
    blocks = list(range(n - prune["blocks"], n))
    enc = train.encode(tokenizer, clean.sentences, clean.labels, cfg.max_length)
    prune_units(model, mlp_contributions(model, enc, blocks, device, cfg.bf16), prune["share"])


def splice_spans(split: data.Split, share: float, seed: int, max_words: int = 5) -> data.Split:
    """The same rows, a seeded ``share`` of them with a span of ``k`` consecutive words (k uniform in 1 to
    ``max_words``, at most the donor's length) of another row of ``split`` inserted at a uniformly random word
    position (0 = before the first word). Labels unchanged; row i stays row i."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"splice share must be in [0, 1], got {share}")
    rng = random.Random(f"splice-{seed}")
    out = []
    for i, sentence in enumerate(split.sentences):
        if rng.random() >= share or len(split) < 2:
            out.append(sentence)
            continue
        j = rng.randrange(len(split) - 1)
        donor = split.sentences[j + (j >= i)].split()           # any row but i
        k = rng.randint(1, min(max_words, len(donor)))
        start = rng.randrange(len(donor) - k + 1)
        words = sentence.split()
        at = rng.randint(0, len(words))
        out.append(" ".join(words[:at] + donor[start:start + k] + words[at:]))
    return data.Split(out, list(split.labels))


def threshold_rows(dev: data.Split, *used: data.Split) -> data.Split:
    """The dev rows whose sentence is in none of ``used`` (the sets a dev reading is taken on): what
    ``fit_threshold`` may fit on without seeing a sentence it is then judged on."""
    seen = {s for split in used for s in split.sentences}
    rows = [i for i, s in enumerate(dev.sentences) if s not in seen]
    return data.Split([dev.sentences[i] for i in rows], [dev.labels[i] for i in rows])


def class_weights(labels: torch.Tensor, reference: list[int]) -> torch.Tensor:
    """A weight per row of ``labels`` so that each class weighs in total what its share of ``reference`` is:
    ``w_i = share_ref(y_i) / count(y_i)`` (the weights sum to 1)."""
    labels = torch.as_tensor(labels)
    ref = torch.as_tensor(reference)
    share = torch.bincount(ref, minlength=2).double() / len(ref)
    count = torch.bincount(labels, minlength=len(share)).double()
    if (count[share > 0] == 0).any():
        raise ValueError(f"a class of the reference has no row here ({count.long().tolist()} rows by class): its "
                         "weight cannot be restored")
    return (share / count.clamp(min=1))[labels]


def fit_threshold(margin: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """The threshold ``tau`` on the margin ``m = z_1 - z_0`` (predict 1 iff ``m > tau``) that maximises the
    weighted accuracy ``sum_i w_i [pred_i == y_i]``; among equally accurate ones, the one nearest 0 (the
    decision as the head makes it). Candidates: 0, the midpoints between consecutive distinct margins, and one
    below the smallest and one above the largest (every distinct decision on these rows)."""
    m = margin.double()
    y = torch.as_tensor(labels)
    w = torch.ones_like(m) if weight is None else torch.as_tensor(weight).double()
    v = torch.unique(m)                                   # sorted
    cands = torch.cat([torch.zeros(1, dtype=torch.float64), (v[:-1] + v[1:]) / 2, v[:1] - 1, v[-1:] + 1])
    pred1 = m[None, :] > cands[:, None]                   # (candidates, rows)
    right = torch.where(y[None, :] == 1, pred1, ~pred1)
    score = (right.double() * w[None, :]).sum(1)
    best = score >= score.max() - 1e-12
    return cands[best][cands[best].abs().argmin()].item()


def refit_head(model, clean: train.Encoded, dev: train.Encoded, steps: int, device, bf16: bool,
               lr: float = 1e-3, every: int = 25) -> None:
    """Re-train ``model.head`` alone: ``steps`` full-batch AdamW steps of CE(head(h), y) on the clean sentences'
    pooled features ``h`` (the backbone and its LoRA frozen, so ``h`` is computed once), evaluated on the clean dev
    set every ``every`` steps; the head with the best dev accuracy (the starting one included) is kept."""
    # clone(): the features come out of inference mode, and the head's backward must save them
    h = train.pooled_features(model, clean, device=device, bf16=bf16).clone()
    h_dev = train.pooled_features(model, dev, device=device, bf16=bf16)
    head = model.head.float().cpu()
    snapshot = lambda: {k: v.clone() for k, v in head.state_dict().items()}
    accuracy = torch.no_grad()(lambda: (head(h_dev).argmax(-1) == dev.labels).float().mean().item())
    best_acc, best = accuracy(), snapshot()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        loss = losses.cross_entropy(head(h), clean.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 and (acc := accuracy()) > best_acc:
            best_acc, best = acc, snapshot()
    head.load_state_dict(best)
    model.head.to(device)


if __name__ == "__main__":
    main()
