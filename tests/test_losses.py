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


def test_mixing_interpolates_toward_the_reference_weights():
    # interpolate_weights (mix-w2s's first step, and the calibration script's mix lever): w <- w_ref + k (w - w_ref),
    # by hand on one weight: w = (1, 3), w_ref = (5, -1), k = 0.25 -> (5 - 1, -1 + 1) = (4, 0); k = 1 and k = 0 are
    # the ends.
    from defenses import interpolate_weights
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


