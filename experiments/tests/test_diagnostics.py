"""The dev-side diagnostics (experiments/feature_gap.py, head_growth.py, latent_shift.py, block_reset.py, sam_scale.py)
by hand, and the experiment scripts' checks of their command line before any work."""

import pytest
import torch


@pytest.mark.parametrize("script, extra, message", [
    # the trigger is measured on non-target dev sentences; SST-2's SCPN dev file paraphrases only negative ones,
    # so the reported direction (target 0) has none
    ("calibrate_w2s", ["--grid", "[{}]"], "the syntactic attack has no triggered non-target dev sentences here: "
                                          "sst2: the SCPN dev file paraphrases only label-0 dev rows"),
    # the diagnostics measure an inserted trigger
    ("feature_gap", [], "measures an inserted trigger"), ("latent_shift", [], "measures an inserted trigger")])
def test_dev_side_experiment_scripts_refuse_the_syntactic_attack_before_any_work(script, extra, message, tmp_path,
                                                                                  capsys):
    import importlib
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit, match=f"{script}.py: {message}"):
        main(["--attack", "syntactic", "--stages", str(tmp_path / "s"), *extra])
    # w2s.py's checks first, the same: as the command line is read (the message on stderr) or after (in the exit)
    with pytest.raises(SystemExit) as refused:
        main(["--rank", "0", "--stages", str(tmp_path / "s"), *extra])
    assert "--rank" in f"{refused.value}\n{capsys.readouterr().err}"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("script, extra, message", [
    ("block_reset", ["--groups", "0-9", "0-99"], "block group '0-99' is outside the blocks 0-29"),
    ("latent_shift", ["--blocks", "4", "30"], r"blocks must be in 0..29, got \[4, 30\]"),
    ("sam_scale", ["--rho", "2", "-1"], "--rho is a perturbation's radius, at least 0"),
])
def test_experiment_scripts_check_block_indices_and_radii_before_any_work(script, extra, message, tmp_path):
    """The default student's 30 blocks, read from its metadata (``models.decoder_depth``) before the attack trains."""
    import importlib
    with pytest.raises(SystemExit, match=f"{script}.py: {message}"):
        importlib.import_module(script).main(["--stages", str(tmp_path / "s"), *extra])
    assert not (tmp_path / "s").exists()


def test_feature_gap_distances_by_hand():
    # experiments/feature_gap.py: per-row squared L2 summed over the feature, averaged over rows.
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


def test_head_growth_margin_direction_by_hand():
    # experiments/head_growth.py: the norm of the head's row difference w_0 - w_1 = ||(3, 0) - (0, 4)|| = 5
    import head_growth
    assert head_growth.margin_direction({"head.bias": torch.zeros(2),
                                         "head.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]])}) == pytest.approx(5.0)
    with pytest.raises(SystemExit, match="3 classes"):
        head_growth.margin_direction({"head.weight": torch.zeros(3, 2)})


def test_head_growth_log_summary_by_hand():
    # experiments/head_growth.py --logs: FA first 10; the last 2 steps' FA (6 + 4) / 2 = 5, CE (0.2 + 0.4) / 2 = 0.3;
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
    # experiments/latent_shift.py: clean norms 5, 0, 10 -> median 5; moves (0,1), (2,0), (0,3): norms 1, 2, 3 -> median 2;
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


def test_block_reset_copies_a_group_of_blocks_back_and_refuses_a_bad_group():
    # experiments/block_reset.py: the group's blocks become the reference's, nothing else moves; "emb" is the embeddings.
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
