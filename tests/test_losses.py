"""Each W2SDefense loss term against a value computed by hand on tiny tensors."""

import math

import pytest
import torch

import losses


def test_cross_entropy_by_hand():
    # -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    z_s, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert losses.cross_entropy(z_s, y).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_distillation_kl_by_hand_with_T_squared_and_teacher_as_target():
    z_s, z_t = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    # T = 2: p_t = softmax([1, 0]) = [e/(e+1), 1/(e+1)], p_s = [1/2, 1/2]
    p_t = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl_t_s = sum(p * math.log(p / 0.5) for p in p_t)          # KL(p_t || p_s) = 0.110944
    kl_s_t = sum(0.5 * math.log(0.5 / p) for p in p_t)        # the other direction = 0.120115
    got = losses.distillation_kl(z_s, z_t, T=2.0).item()
    assert got == pytest.approx(4 * kl_t_s, abs=1e-6)          # T^2 = 4
    assert got == pytest.approx(0.4437763, abs=1e-6)
    assert abs(got - 4 * kl_s_t) > 0.03                        # the direction matters


def test_distillation_kl_is_zero_when_distributions_match():
    z = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 1.0]])
    assert losses.distillation_kl(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_alignment_is_per_example_not_broadcast():
    h_s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    h_t = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # per example: ||(0, -2)||^2 = 4, ||(3, 4)||^2 = 25 -> mean 14.5
    assert losses.feature_alignment(h_s, h_t).item() == pytest.approx(14.5)
    # the public code's broadcast against the LAST teacher feature would give (8 + 25) / 2 = 16.5
    assert losses.feature_alignment(h_s, h_t).item() != pytest.approx(16.5)


def test_normalized_feature_alignment_by_hand_ignores_scale():
    h_s = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    h_t = torch.tensor([[0.0, 0.5], [0.0, 2.0]])
    # unit vectors: (1, 0) vs (0, 1) -> ||(-1, 1)||^2 = 2 = 2 (1 - cos 90 deg); (0, 1) vs (0, 1) -> 0; mean 1
    assert losses.feature_alignment_normalized(h_s, h_t).item() == pytest.approx(1.0)
    # scaling either feature changes nothing; the plain FA is dominated by the scale
    assert losses.feature_alignment_normalized(100 * h_s, h_t).item() == pytest.approx(1.0)
    assert losses.feature_alignment(100 * h_s, h_t).item() > 1e4
    # cos 60 deg: 2 (1 - 1/2) = 1
    got = losses.feature_alignment_normalized(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 3 ** 0.5 / 2]]))
    assert got.item() == pytest.approx(1.0, abs=1e-6)
    _, terms = losses.w2s_loss(torch.zeros(2, 2), h_s, torch.tensor([0, 1]), torch.zeros(2, 2), h_t,
                               1.0, 0.0, 1.0, fa="normalized")
    assert terms["fa"] == pytest.approx(1.0)


def test_feature_alignment_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="projection"):
        losses.feature_alignment(torch.zeros(2, 3), torch.zeros(2, 4))


def test_weighted_sum_by_hand():
    z_s, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    z_t = torch.tensor([[0.0, 2.0]])
    h_s, h_t = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])
    ce = math.log(1 + math.exp(-2))
    # T = 2: p_s = softmax([1, 0]), p_t = softmax([0, 1])
    a, b = math.e / (math.e + 1), 1 / (math.e + 1)
    kd = 4 * (b * math.log(b / a) + a * math.log(a / b))
    fa = 1.0 + 4.0
    total, terms = losses.w2s_loss(z_s, h_s, y, z_t, h_t, alpha=5.0, beta=0.5, gamma=0.1, T=2.0)
    assert total.item() == pytest.approx(5 * ce + 0.5 * kd + 0.1 * fa, abs=1e-5)
    assert terms == pytest.approx({"ce": ce, "kd": kd, "fa": fa}, abs=1e-5)


def test_control_is_exactly_alpha_times_ce():
    z_s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    total, _ = losses.w2s_loss(z_s, torch.randn(4, 5), y, torch.randn(4, 3), torch.randn(4, 5),
                               alpha=5.0, beta=0.0, gamma=0.0)
    assert torch.equal(total, 5.0 * losses.cross_entropy(z_s, y))


def test_only_feature_term_moves_student_when_alpha_beta_zero():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    h_t = torch.randn(4, 2)
    for gamma, expect_grad in ((0.0, False), (1.0, True)):
        student.zero_grad()
        h_s = student(x)
        total, _ = losses.w2s_loss(h_s, h_s, y, torch.randn(4, 2), h_t, alpha=0.0, beta=0.0, gamma=gamma)
        total.backward()
        assert (student.weight.grad.abs().sum() > 0) == expect_grad


def test_all_token_feature_alignment_by_hand_skips_padding():
    # The experimental lever of bench/calibrate_w2s.py: every real token's final state against the sentence's
    # teacher feature. Sentence 0: tokens (1,0), (0,1), (1,1) vs h_t (0,0): 1, 1, 2 -> mean 4/3.
    # Sentence 1: tokens (2,0), (0,0) and a pad (9,9) vs h_t (1,0): 1, 1 -> mean 1. FA = (4/3 + 1) / 2 = 7/6.
    from types import SimpleNamespace
    import calibrate_w2s
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    model = SimpleNamespace(backbone=SimpleNamespace(hidden_states=lambda ids, m: hidden), head=torch.nn.Linear(2, 2))
    batch = SimpleNamespace(inputs=lambda: {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": mask},
                            labels=torch.tensor([0, 1]), index=torch.tensor([0, 1]))
    h_t, z_t = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.zeros(2, 2)
    total, terms = calibrate_w2s.all_token_loss(0.0, 0.0, 1.0, 2.0, z_t, h_t)(model, batch)
    assert terms["fa"] == pytest.approx(7 / 6, abs=1e-6) and total.item() == pytest.approx(7 / 6, abs=1e-6)


def test_feature_gap_distances_by_hand():
    # bench/feature_gap.py: per-row squared L2 summed over the feature, averaged over rows.
    # fa_clean: (1,0)-(0,0) -> 1, (0,0)-(0,2) -> 4: 2.5. fa_trig: (3,0)-(0,0) -> 9, (0,1)-(0,0) -> 1: 5.
    # shift: (3,0)-(1,0) -> 4, (0,1)-(0,0) -> 1: 2.5. teacher_shift: 0, (0,0)-(0,2) -> 4: 2.
    import feature_gap
    s_clean, s_trig = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    t_clean, t_trig = torch.tensor([[0.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2)
    got = feature_gap.feature_gap(s_clean, s_trig, t_clean, t_trig)
    # norm_s: 1, 0 -> 0.5; norm_t: 0, 4 -> 2.
    assert got == pytest.approx({"fa_clean": 2.5, "fa_trig": 5.0, "shift": 2.5, "teacher_shift": 2.0,
                                 "norm_s": 0.5, "norm_t": 2.0})
    # head_view, 3 classes, target 0: W rows (1,0), (0,1), (0,-1), bias (0, 1, 0). m = z_0 - max(z_1, z_2).
    # clean rows (1,0) -> z (1, 1, 0), m 0; (0,0) -> z (0, 1, 0), m -1. triggered (3,0) -> (3, 1, 0), m 2;
    # (0,1) -> (0, 2, -1), m -2. margin_shift = ((2 - 0) + (-2 + 1)) / 2 = 0.5. w = (1,0) - mean((0,1),(0,-1))
    # = (1,0); moves (2,0) and (0,1): cos 1 and 0, mean 0.5.
    weight, bias = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]), torch.tensor([0.0, 1.0, 0.0])
    got = feature_gap.head_view(weight, bias, s_clean, s_trig, target=0)
    assert got == pytest.approx({"margin_shift": 0.5, "cos_head": 0.5})


def test_block_feature_gamma_ramp_and_decay_of_the_calibration_levers():
    # bench/calibrate_w2s.py's block_ramp_loss (experimental levers). FA reads the last real token of
    # norm_f(block-1 output); with alpha = beta = 0 the total is gamma_t * FA and gamma_t = gamma * min(1, t / 4).
    from types import SimpleNamespace
    import calibrate_w2s
    from test_models import tiny_classifier
    import models
    clf = tiny_classifier("llama", n_layer=3, num_classes=2, seed=4)
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = SimpleNamespace(inputs=lambda: {"input_ids": ids, "attention_mask": mask},
                            labels=torch.tensor([0, 1]), index=torch.tensor([1, 0]))
    h_t_all, z_t_all = torch.randn(2, 32), torch.zeros(2, 2)
    with torch.no_grad():
        h_mid = models.last_real_token(clf.backbone.norm_f(clf.backbone.hidden_states(ids, mask, layer=1)), mask)
        h_end = clf.features(ids, mask)
    expect = (h_mid - h_t_all[[1, 0]]).pow(2).sum(-1).mean().item()
    loss = calibrate_w2s.block_ramp_loss(0.0, 0.0, 2.0, 2.0, z_t_all, h_t_all, block=1, ramp_steps=4)
    for t in (1, 2, 3, 4, 5):
        total, terms = loss(clf, batch)
        assert terms["fa"] == pytest.approx(expect, rel=1e-5)
        assert total.item() == pytest.approx(2.0 * min(1, t / 4) * expect, rel=1e-5)
    total, terms = calibrate_w2s.block_ramp_loss(0.0, 0.0, 1.0, 2.0, z_t_all, h_t_all)(clf, batch)   # final feature
    assert terms["fa"] == pytest.approx((h_end - h_t_all[[1, 0]]).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert not clf.backbone.blocks[1]._forward_hooks                 # the hook is removed after each call
    decay = calibrate_w2s.block_ramp_loss(0.0, 0.0, 0.2, 2.0, z_t_all, h_t_all, decay_to=0.05, steps=4)
    expect_end = (h_end - h_t_all[[1, 0]]).pow(2).sum(-1).mean().item()
    for gamma_t in (0.2, 0.15, 0.1, 0.05):                             # 0.2 at step 1 ... 0.05 at step 4, by hand
        total, _ = decay(clf, batch)
        assert total.item() == pytest.approx(gamma_t * expect_end, rel=1e-5)


def test_head_refit_of_the_calibration_levers_trains_the_head_alone_and_keeps_the_best_dev_head():
    # bench/calibrate_w2s.py's refit_head (experimental lever): only the head moves, and on a dev set that the
    # starting head gets all wrong, the kept head is a better one.
    import calibrate_w2s
    import train
    from test_models import tiny_classifier
    clf = tiny_classifier("llama", n_layer=2, num_classes=2, seed=6)
    ids = [[1 + i % 7, 2 + i % 5, 3 + i % 3] for i in range(24)]
    with torch.no_grad():
        start_pred = clf(torch.tensor(ids)).argmax(-1)
    labels = 1 - start_pred                                         # the starting head is wrong on every row
    data = train.Encoded(ids, labels, pad_id=0)
    body = {k: v.clone() for k, v in clf.state_dict().items() if not k.startswith("head.")}
    calibrate_w2s.refit_head(clf, data, data, steps=200, device="cpu", bf16=False, lr=0.05, every=10)
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in body.items())
    with torch.no_grad():
        acc = (clf(torch.tensor(ids)).argmax(-1) == labels).float().mean().item()
    assert acc > 0.5


def test_feature_targets_of_the_calibration_levers_zero_and_shuffled():
    # bench/calibrate_w2s.py's teacher ablation: toward the origin the feature term is ||h_s||^2; shuffled keeps
    # the teacher's rows (a seeded permutation, the same for the same seed) but not their order.
    import calibrate_w2s
    h_s = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    h_t = torch.arange(12.0).reshape(6, 2)
    zero = calibrate_w2s.feature_targets(h_t, "zero", seed=0)
    assert losses.feature_alignment(h_s, zero[:2]).item() == pytest.approx((25.0 + 5.0) / 2)
    assert calibrate_w2s.feature_targets(h_t, "teacher", seed=0) is h_t
    shuffled = calibrate_w2s.feature_targets(h_t, "shuffled", seed=3)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, h_t.tolist()))
    assert not torch.equal(shuffled, h_t)
    assert torch.equal(shuffled, calibrate_w2s.feature_targets(h_t, "shuffled", seed=3))
    with pytest.raises(ValueError, match="teacher, zero, shuffled"):
        calibrate_w2s.feature_targets(h_t, "random", seed=0)


def test_splice_spans_of_the_calibration_lever_inserts_a_span_of_another_row():
    # bench/calibrate_w2s.py's "splice": a seeded share of the rows gets 1 to 5 consecutive words of ANOTHER row
    # inserted at one word position; labels and row order unchanged.
    import calibrate_w2s
    import data
    split = data.Split(["a b c", "d e f g h i j", "k l", "m"], [0, 1, 0, 1])
    assert calibrate_w2s.splice_spans(split, 0.0, seed=0) == split
    spliced = calibrate_w2s.splice_spans(split, 1.0, seed=0)
    assert spliced.labels == split.labels and spliced == calibrate_w2s.splice_spans(split, 1.0, seed=0)
    for i, (old, new) in enumerate(zip(split.sentences, spliced.sentences)):
        old, new = old.split(), new.split()
        k = len(new) - len(old)
        assert 1 <= k <= 5
        # some cut of the old sentence, with k consecutive words of one other row in it
        found = [(at, j) for at in range(len(old) + 1) for j, donor in enumerate(split.sentences) if j != i
                 and new[:at] + new[at + k:] == old and " ".join(new[at:at + k]) in donor]
        assert found, (old, new)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        calibrate_w2s.splice_spans(split, 1.5, seed=0)


def test_head_growth_margin_direction_by_hand():
    # bench/head_growth.py: the norm of the head's row difference w_0 - w_1 = ||(3, 0) - (0, 4)|| = 5
    import head_growth
    assert head_growth.margin_direction({"head.bias": torch.zeros(2),
                                         "head.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}) == pytest.approx(5.0)
    with pytest.raises(SystemExit, match="3 classes"):
        head_growth.margin_direction({"head.weight": torch.zeros(3, 2)})


def test_head_growth_log_summary_by_hand():
    # bench/head_growth.py --logs: FA first 10; the last 2 steps' FA (6 + 4) / 2 = 5, CE (0.2 + 0.4) / 2 = 0.3;
    # KL share beta*kd / (alpha*ce) per step: 0.1*1/(1*0.5) = 0.2, 0.1*2/0.2 = 1.0, 0.1*3/0.4 = 0.75
    import head_growth
    history = [{"fa": 10.0, "ce": 0.5, "kd": 1.0}, {"fa": 6.0, "ce": 0.2, "kd": 2.0}, {"fa": 4.0, "ce": 0.4, "kd": 3.0}]
    out = head_growth.log_summary(history, {"alpha": 1.0, "beta": 0.1}, last=2)
    assert out["fa_first"] == 10.0 and out["fa_last"] == pytest.approx(5.0) and out["ce_last"] == pytest.approx(0.3)
    assert out["kl_share_median"] == pytest.approx(0.75) and out["kl_share_max"] == pytest.approx(1.0)
    control = head_growth.log_summary([{"ce": h["ce"]} for h in history], {"alpha": 1.0, "beta": 0.0}, last=2)
    assert control == {"fa_first": None, "fa_last": None, "ce_last": pytest.approx(0.3),
                       "kl_share_median": None, "kl_share_max": None}


def test_latent_shift_stats_by_hand():
    # bench/latent_shift.py: clean norms 5, 0, 10 -> median 5; moves (0,1), (2,0), (0,3): norms 1, 2, 3 -> median 2;
    # mean move (2/3, 4/3) ~ (1, 2): cosines 2/sqrt5, 1/sqrt5, 2/sqrt5 -> mean sqrt5 / 3.
    import latent_shift
    x_clean = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    x_trig = x_clean + torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    got = latent_shift.shift_stats(x_clean, x_trig)
    assert got == pytest.approx({"norm": 5.0, "shift": 2.0, "uniformity": 5 ** 0.5 / 3})
    # class means (3, 4) and mean((0, 0), (6, 8)) = (3, 4): gap 0; moving the class-1 rows by (0, 2): gap 2.
    assert latent_shift.class_gap(x_clean, torch.tensor([1, 0, 0])) == pytest.approx(0.0)
    assert latent_shift.class_gap(x_clean + torch.tensor([[0.0, 2.0], [0, 0], [0, 0]]), torch.tensor([1, 0, 0])) \
        == pytest.approx(2.0)


def test_latent_adversarial_lever_adds_one_perturbation_per_class_and_ascends_within_the_ball():
    # bench/calibrate_w2s.py's latent_adversarial (experimental lever). Step 1: delta = 0, so the second forward
    # is the clean one. Step 2: delta_c = P(step * g_c / ||g_c||) with step 3 > eps 0.5: eps * g_c / ||g_c||;
    # class 1 has no row in the batch (zero gradient) and stays 0. The adversarial term equals the CE of a forward
    # whose residual stream after block 1 gets delta_y at the real tokens only (checked through the prefix entry).
    from types import SimpleNamespace
    import calibrate_w2s
    from test_models import tiny_classifier
    clf = tiny_classifier("llama", n_layer=3, num_classes=2, seed=5)
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([0, 0])
    batch = SimpleNamespace(inputs=lambda: {"input_ids": ids, "attention_mask": mask}, labels=labels,
                            index=torch.tensor([0, 1]))
    base = lambda model, b: (torch.zeros(()), {"ce": 0.0})
    loss = calibrate_w2s.latent_adversarial(base, block=1, eps=0.5, weight=2.0, step=3.0)
    total, terms = loss(clf, batch)
    assert total.item() == pytest.approx(2.0 * losses.cross_entropy(clf(ids, mask), labels).item(), rel=1e-5)
    total.backward()
    g = loss.delta().grad.clone()
    assert g[0].norm() > 0 and torch.equal(g[1], torch.zeros_like(g[1]))
    total, terms = loss(clf, batch)
    delta = loss.delta().detach()
    assert torch.allclose(delta[0], 0.5 * g[0] / g[0].norm(), atol=1e-6) and torch.equal(delta[1], torch.zeros_like(delta[1]))
    assert terms["delta"] == pytest.approx(0.5, rel=1e-5)
    with torch.no_grad():
        x = clf.backbone.hidden_states(ids, mask, layer=1) + delta[labels][:, None] * mask[..., None]
        expect = losses.cross_entropy(clf(ids, mask, prefix=(x, 2)), labels).item()
    assert terms["adv"] == pytest.approx(expect, rel=1e-5)
    assert not clf.backbone.blocks[1]._forward_hooks                    # the hook is removed after each call
    # A step that stays inside the ball is not projected: step 0.1 < eps 0.5 gives delta_0 = 0.1 * g_0 / ||g_0||.
    small = calibrate_w2s.latent_adversarial(base, block=1, eps=0.5, weight=2.0, step=0.1)
    small(clf, batch)[0].backward()
    g = small.delta().grad.clone()
    small(clf, batch)
    assert torch.allclose(small.delta().detach()[0], 0.1 * g[0] / g[0].norm(), atol=1e-6)


def test_head_lever_of_the_calibration_script_keeps_resets_or_freezes_the_head():
    import calibrate_w2s
    import defenses
import w2s
    from test_models import tiny_classifier
    for head in ("keep", "fresh", "frozen"):
        clf = tiny_classifier("llama", n_layer=2, num_classes=2, seed=6)
        before = clf.head.weight.detach().clone()
        defenses.add_lora(clf, w2s.UnlearnConfig(rank=2, lora_alpha=2.0))
        calibrate_w2s.prepare_head(clf, head, seed=0)
        assert torch.equal(clf.head.weight, before) == (head != "fresh")
        assert clf.head.weight.requires_grad == (head != "frozen")
        trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith((".A", ".B")) or n.startswith("head.") for n in trainable)
        assert any(n.startswith("head.") for n in trainable) == (head != "frozen")
    with pytest.raises(ValueError, match="keep, fresh, frozen"):
        calibrate_w2s.prepare_head(clf, "random", seed=0)


def test_last_terms_of_the_calibration_script_by_hand():
    import calibrate_w2s
    history = [{"step": s, "loss": float(s), "fa": 10.0 * s} for s in range(1, 31)]    # last 25: steps 6..30
    assert calibrate_w2s.last_terms(history) == {"loss": 18.0, "fa": 180.0}
    assert calibrate_w2s.last_terms(history[:2], n=25) == {"loss": 1.5, "fa": 15.0}
    assert calibrate_w2s.last_terms([]) == {}


def test_prune_lever_of_the_calibration_script_scores_units_on_real_tokens_and_removes_the_weakest():
    # bench/calibrate_w2s.py's prune lever (experimental). The score of unit j in block b is the mean over real
    # tokens of |a_j| times ||W_down[:, j]||, a_j = silu(gate_j(h)) * up_j(h), h = norm2 of the residual stream
    # after block b's attention: recomputed here from the block's parts, one unpadded sentence at a time (so a
    # padding token counted by the batched pass would show).
    import torch.nn.functional as F
    import calibrate_w2s
    import train
    from test_models import tiny_classifier
    clf = tiny_classifier("llama", n_layer=3, num_classes=2, seed=7)
    ids = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    data = train.Encoded(ids, torch.tensor([0, 1, 0]), pad_id=0)
    got = calibrate_w2s.mlp_contributions(clf, data, [1, 2], "cpu", bf16=False, batch_size=3)
    for b in (1, 2):
        block = clf.backbone.blocks[b]
        acts = []
        with torch.no_grad():
            for row in ids:
                x = torch.tensor([row])
                mask = torch.ones_like(x)
                h = clf.backbone.hidden_states(x, mask, layer=b - 1)                      # b >= 1
                captured = {}
                hook = block.attn.register_forward_hook(lambda m, i, out: captured.update(attn=out))
                block(h, *clf_block_args(clf, x, mask))
                hook.remove()
                n2 = block.norm2(h + captured["attn"])
                acts.append((F.silu(block.mlp.gate_proj(n2)) * block.mlp.up_proj(n2))[0])      # (len, d_ff)
        expect = torch.cat(acts).abs().mean(0) * block.mlp.down_proj.weight.norm(dim=0)
        assert torch.allclose(got[b], expect, rtol=1e-4, atol=1e-6)
    # prune_units by hand: scores (3, 1, 2, 1, 0, 5, then 10s) and share 3 / d_ff -> the three smallest: 4, 1, 3
    # (ties to the lower index); their down columns are zero, the others untouched.
    w = clf.backbone.blocks[2].mlp.down_proj.weight
    before = w.detach().clone()
    score = torch.zeros(w.shape[1]) + 10.0
    score[:6] = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.0, 5.0])
    removed = calibrate_w2s.prune_units(clf, {2: score}, share=3 / w.shape[1])
    assert removed[2].tolist() == [4, 1, 3]
    assert torch.equal(w[:, [1, 3, 4]], torch.zeros(w.shape[0], 3))
    keep = [j for j in range(w.shape[1]) if j not in (1, 3, 4)]
    assert torch.equal(w[:, keep], before[:, keep])
    with pytest.raises(ValueError, match="share"):
        calibrate_w2s.prune_units(clf, {2: score}, share=1.0)


def clf_block_args(clf, x, mask):
    """(mask, rope) of a Llama-style block's forward for the unpadded ids ``x``, as the backbone builds them."""
    import models
    positions, attn_mask = models.positions_and_mask(mask, x.shape[1], x.device)
    rope = models.rope_cos_sin(positions, clf.backbone.cfg.head_dim, clf.backbone.cfg.rope_base)
    return attn_mask, rope


def test_mixing_interpolates_toward_the_reference_weights():
    # interpolate_weights (mix-w2s's first step, and the calibration script's mix lever): w <- w_ref + k (w - w_ref),
    # by hand on one weight: w = (1, 3), w_ref = (5, -1), k = 0.25 -> (5 - 1, -1 + 1) = (4, 0); k = 1 and k = 0 are
    # the ends.
    from w2s import interpolate_weights
    from test_models import tiny_classifier
    a = tiny_classifier("llama", n_layer=2, num_classes=2, seed=8).backbone
    b = tiny_classifier("llama", n_layer=2, num_classes=2, seed=9).backbone
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    w, w_ref = a.blocks[0].norm1.weight, b.blocks[0].norm1.weight
    with torch.no_grad():
        w[:2], w_ref[:2] = torch.tensor([1.0, 3.0]), torch.tensor([5.0, -1.0])
    interpolate_weights(a, b, 0.25)
    assert w[:2].tolist() == [4.0, 0.0]
    c = tiny_classifier("llama", n_layer=2, num_classes=2, seed=8).backbone
    interpolate_weights(c, b, 1.0)
    assert all(torch.equal(p, before[n]) for n, p in c.named_parameters())
    interpolate_weights(c, b, 0.0)
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in c.named_parameters())
    with pytest.raises(ValueError, match="same architecture"):
        interpolate_weights(c, tiny_classifier("llama", n_layer=3, num_classes=2, seed=8).backbone, 0.5)
    with pytest.raises(ValueError, match=r"mix must be in \[0, 1\]"):
        interpolate_weights(c, b, 1.5)


def test_mixing_by_group_gives_a_group_of_blocks_its_own_factor():
    # bench/calibrate_w2s.py's mix_blocks lever: with no group it is interpolate_weights to the bit; a group at 0
    # is the reference's blocks, the other blocks and the embeddings are mixed by k. By hand on one weight of a
    # block outside the group: w = (1, 3), w_ref = (5, -1), k = 0.25 -> (4, 0).
    import calibrate_w2s
    from w2s import interpolate_weights
    from test_models import tiny_classifier
    fresh = lambda: tiny_classifier("llama", n_layer=3, num_classes=2, seed=8).backbone
    ref = tiny_classifier("llama", n_layer=3, num_classes=2, seed=9).backbone
    plain, grouped = fresh(), fresh()
    interpolate_weights(plain, ref, 0.25)
    calibrate_w2s.mix_by_group(grouped, ref, 0.25, {})
    assert all(torch.equal(p, dict(plain.named_parameters())[n]) for n, p in grouped.named_parameters())
    grouped = fresh()
    w, w_ref = grouped.blocks[2].norm1.weight, ref.blocks[2].norm1.weight
    with torch.no_grad():
        w[:2], w_ref[:2] = torch.tensor([1.0, 3.0]), torch.tensor([5.0, -1.0])
    calibrate_w2s.mix_by_group(grouped, ref, 0.25, {"0-1": 0.0})
    assert w[:2].tolist() == [4.0, 0.0]
    for b in (0, 1):
        assert all(torch.equal(p, dict(ref.blocks[b].named_parameters())[n])
                   for n, p in grouped.blocks[b].named_parameters())
    assert torch.equal(grouped.tok_emb.weight, plain.tok_emb.weight)
    untouched = fresh()
    for groups, message in [({"0-3": 0.0}, "outside the blocks"), ({"0-1": 0.0, "1-2": 0.5}, "overlaps"),
                            ({"bottom": 0.0}, "is not 'a-b'"), ({"0-1": 1.5}, r"in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            calibrate_w2s.mix_by_group(untouched, ref, 0.25, groups)
        assert all(torch.equal(p, dict(fresh().named_parameters())[n]) for n, p in untouched.named_parameters())
    with pytest.raises(ValueError, match="same architecture"):
        calibrate_w2s.mix_by_group(untouched, tiny_classifier("llama", n_layer=2, num_classes=2, seed=9).backbone, 0.25, {})


def test_block_reset_copies_a_group_of_blocks_back_and_refuses_a_bad_group():
    # bench/block_reset.py: the group's blocks become the reference's, nothing else moves; "emb" is the embeddings.
    import block_reset
    from test_models import tiny_classifier
    model = tiny_classifier("llama", n_layer=3, num_classes=2, seed=8)
    ref = tiny_classifier("llama", n_layer=3, num_classes=2, seed=9).backbone
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    block_reset.reset_to(model, ref, block_reset.parse_group("1-2", 3))
    for n, p in model.backbone.named_parameters():
        moved = n.startswith(("blocks.1.", "blocks.2."))
        assert torch.equal(p, dict(ref.named_parameters())[n] if moved else before[n]), n
    block_reset.reset_to(model, ref, block_reset.parse_group("emb", 3))
    assert torch.equal(model.backbone.tok_emb.weight, ref.tok_emb.weight)
    for bad in ("2-3", "top", "2-1"):
        with pytest.raises(SystemExit, match="block_reset.py: block group"):
            block_reset.parse_group(bad, 3)


def test_threshold_of_the_calibration_levers_is_the_most_accurate_and_nearest_zero_by_hand():
    # bench/calibrate_w2s.py's fit_threshold (experimental lever): predict 1 iff m > tau.
    import calibrate_w2s
    import data
    m = torch.tensor([-2.0, -0.5, 0.3, 1.0])
    y = torch.tensor([0, 1, 0, 1])
    # by hand: tau = 0 gets rows 0 and 3 right (2 of 4); the candidates -1.25 (preds 0,1,1,1) and 0.65 (0,0,0,1)
    # get 3 each, every other 2; of the two best, 0.65 is nearer 0
    assert calibrate_w2s.fit_threshold(m, y) == pytest.approx(0.65)
    # weighting row 1 (a 1 at -0.5) three times: -1.25 scores 1 + 3 + 1 = 5, 0.65 scores 1 + 1 + 1 = 3
    assert calibrate_w2s.fit_threshold(m, y, torch.tensor([1.0, 3.0, 1.0, 1.0])) == pytest.approx(-1.25)
    # the head's own decision is already the best: it stays (0, not the interval's midpoint 0.5)
    assert calibrate_w2s.fit_threshold(torch.tensor([-1.0, 2.0]), torch.tensor([0, 1])) == 0.0
    # each class weighs its share of the reference: 3 zeros and 1 one, against a 50/50 reference
    w = calibrate_w2s.class_weights(torch.tensor([0, 0, 0, 1]), [0, 1, 0, 1])
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    with pytest.raises(ValueError, match="no row"):
        calibrate_w2s.class_weights(torch.tensor([0, 0]), [0, 1])
    dev = data.Split(["a", "b", "c", "d"], [0, 1, 1, 0])
    rest = calibrate_w2s.threshold_rows(dev, data.Split(["b"], [1]), data.Split(["d", "b"], [0, 1]))
    assert (rest.sentences, rest.labels) == (["a", "c"], [0, 1])


def test_logits_are_what_predict_takes_the_argmax_of():
    import train
    from test_models import tiny_classifier
    clf = tiny_classifier("llama", n_layer=2, num_classes=3, seed=6)
    ids = [[1 + i % 7, 2 + i % 5, 3 + i % 3][: 1 + i % 3] for i in range(10)]
    data = train.Encoded(ids, torch.zeros(10, dtype=torch.long), pad_id=0)
    z = train.logits(clf, data, batch_size=4)
    assert z.shape == (10, 3) and z.dtype == torch.float32
    with torch.no_grad():
        for i, row in enumerate(ids):
            assert torch.allclose(z[i], clf(torch.tensor([row]))[0], atol=1e-5)
    assert torch.equal(train.predict(clf, data, batch_size=4), z.argmax(-1))


def test_anchor_of_the_calibration_levers_by_hand():
    # bench/calibrate_w2s.py's "anchor" (experimental lever): loss_fn's total plus w * T^2 * KL(p_p || p_s), p_p the
    # poisoned student's softmax(z_p / T) of the same row. The head is the identity; T = 2.
    # Row 0: z_s (0, 0) -> p_s (1/2, 1/2); z_p (2 ln 3, 0) -> p_p (3/4, 1/4);
    #   KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; T^2 KL = 0.523248. Row 1: z_s = z_p -> 0. Mean 0.261624.
    import math
    from types import SimpleNamespace
    import calibrate_w2s
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    model = SimpleNamespace(head=head)
    h = torch.tensor([[0.0, 0.0], [1.0, -1.0]])

    def inner(model, batch):                                         # a loss of one forward pass through the head
        model.head(h)
        return torch.tensor(0.25), {"ce": 0.25}

    z_p_all = torch.tensor([[1.0, -1.0], [2 * math.log(3), 0.0]])      # looked up by row: batch rows are 1, 0
    batch = SimpleNamespace(index=torch.tensor([1, 0]))
    total, terms = calibrate_w2s.anchored(inner, z_p_all, weight=2.0, T=2.0)(model, batch)
    expect = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) * 4 / 2
    assert terms["anchor"] == pytest.approx(expect, abs=1e-6) and terms["ce"] == 0.25
    assert total.item() == pytest.approx(0.25 + 2.0 * expect, abs=1e-6)
    assert not head._forward_hooks                                   # the hook is removed after each call
    twice = lambda model, batch: (model.head(h).sum() + model.head(h).sum(), {})
    with pytest.raises(ValueError, match="one forward pass"):
        calibrate_w2s.anchored(twice, z_p_all, weight=1.0)(model, batch)


def test_feature_shift_of_the_calibration_levers_by_hand():
    # bench/calibrate_w2s.py's "fst" (experimental lever). W_p = [[1, 0], [-1, 2]]: mean row (0, 1),
    # D(W_p) = [[1, -1], [-1, 1]], ||D(W_p)||^2 = 4. W = [[2, 1], [0, 1]]: mean row (1, 1), D(W) = [[1, 0], [-1, 0]],
    # <D(W), D(W_p)> = 1 + 1 = 2, so the term is 2 / 4 = 0.5; the poisoned head itself gives 1, -W_p gives -1.
    from types import SimpleNamespace
    import calibrate_w2s
    w_p = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    w = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    assert torch.equal(calibrate_w2s.head_directions(w_p), torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert calibrate_w2s.fst_penalty(w, w_p).item() == pytest.approx(0.5)
    assert calibrate_w2s.fst_penalty(w_p, w_p).item() == pytest.approx(1.0)
    assert calibrate_w2s.fst_penalty(-w_p, w_p).item() == pytest.approx(-1.0)
    # the projection: ||D(W)|| = sqrt(2) <= 2, left as it is; W = [[4, 0], [0, 0]]: mean row (2, 0),
    # D = [[2, 0], [-2, 0]], norm sqrt(8) > 2, scaled by 2 / sqrt(8) to [[sqrt 2, 0], [-sqrt 2, 0]], mean row kept:
    # [[2 + sqrt 2, 0], [2 - sqrt 2, 0]]
    inside = w.clone()
    calibrate_w2s.project_head(inside, w_p)
    assert torch.equal(inside, w)
    outside = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    calibrate_w2s.project_head(outside, w_p)
    r2 = 2 ** 0.5
    assert torch.allclose(outside, torch.tensor([[2 + r2, 0.0], [2 - r2, 0.0]]))
    # the loss: loss_fn's total plus weight * term, logged as "fst"
    model = SimpleNamespace(head=SimpleNamespace(weight=w))
    total, terms = calibrate_w2s.feature_shift(lambda m, b: (torch.tensor(0.25), {"ce": 0.25}), w_p, 2.0)(model, None)
    assert total.item() == pytest.approx(0.25 + 2.0 * 0.5) and terms == {"ce": 0.25, "fst": pytest.approx(0.5)}


def test_feature_shift_holds_the_head_in_the_ball_after_every_step_and_only_while_open():
    # projected_head hooks every optimizer's step (train.fit makes its own fused AdamW): a step that throws the
    # head out of the ball ||D(W)|| <= ||D(W_p)|| is followed by the projection; once closed, nothing is hooked.
    import calibrate_w2s
    import train
    head = torch.nn.Linear(3, 2, bias=False)
    w_p = torch.tensor([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]])                     # ||D(W_p)|| = sqrt(0.02)
    limit = calibrate_w2s.head_directions(w_p).norm().item()
    with torch.no_grad():
        head.weight.copy_(torch.zeros(2, 3))
    opt = train.make_optimizer(list(head.parameters()), lr=1.0, weight_decay=0.0, device="cpu")

    def step():
        opt.zero_grad()
        (head.weight * torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]])).sum().backward()
        opt.step()
    with calibrate_w2s.projected_head(head, w_p):
        step()                                      # Adam's first step moves each weight by lr = 1: far outside
        assert calibrate_w2s.head_directions(head.weight).norm().item() == pytest.approx(limit, rel=1e-5)
    step()
    assert calibrate_w2s.head_directions(head.weight).norm().item() > 10 * limit
