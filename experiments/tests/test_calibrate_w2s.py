"""experiments/calibrate_w2s.py: its grid on the tiny world (one JSON line per entry), the checks of its command line
before any stage trains, its dev-side draw (``dev_pairs``), and each experimental lever by hand on tiny tensors."""

import json
import random
from pathlib import Path

import pytest
import torch

import attacks
import data
import losses
import models
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_argv


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_calibration_script_runs_a_grid_on_tiny_models_one_json_line_per_entry(tmp_path, capsys, monkeypatch):
    """experiments/calibrate_w2s.py, which every choice of the defaults went through: the header line, then one line per
    grid entry with the dev measures (fractions); trained entries add the kept checkpoint's dev accuracy and the
    loss terms' last-25 means; the levers that change the model before training (here the mix) run too."""
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    # the tiny dev set is all taken by the dev readings; the threshold line fits on all of it here (which rows it
    # may use on SST-2 is threshold_rows' test, below)
    monkeypatch.setattr(calibrate_w2s, "threshold_rows", lambda dev, *used: dev)
    grid = [{"defense": "none"}, {"defense": "lora"}, {}, {"defense": "none", "mix": 0.0},
            {"defense": "none", "fit_threshold": True}, {"mix": 0.0, "anchor": 1.0}, {"fst": 1.0},
            {"sam": 0.5}]
    calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps(grid)))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["attack"] == "badnet" and 0 <= header["teacher_dev_acc"] <= 1 and 0 <= header["poisoned_dev_acc"] <= 1
    dev_labels = [line.rsplit("\t", 1)[1] for line in (Path(ds) / "dev.tsv").read_text().splitlines()[1:]]
    assert header["dev_asr_rows"] == min(150, sum(y != "0" for y in dev_labels))     # every non-target dev row, up to 150
    assert [r["defense"] for r in rows] == ["none", "lora", "w2sdefense", "none", "none", "w2sdefense", "w2sdefense",
                                            "w2sdefense"]
    assert rows[7]["over"] == {"sam": 0.5} and set(rows[7]["last25"]) >= {"ce", "kd", "fa", "sharp"}
    assert rows[6]["over"] == {"fst": 1.0} and -1.0 <= rows[6]["last25"]["fst"] <= 1.0     # held in the ball
    assert rows[3]["over"] == {"mix": 0.0}
    assert rows[5]["over"] == {"mix": 0.0, "anchor": 1.0} and rows[5]["last25"]["anchor"] >= 0.0
    # the threshold line is the poisoned student again, read as it is and with its decision moved
    assert rows[4]["over"] == {"fit_threshold": True}
    assert {k: rows[4][k] for k in ("dev_ca", "dev_asr", "dev_asr_floor")} == \
        {k: rows[0][k] for k in ("dev_ca", "dev_asr", "dev_asr_floor")}
    moved = rows[4]["threshold"]
    assert moved["fit_rows"] > 0 and all(0.0 <= moved[k] <= 1.0 for k in ("dev_ca", "dev_asr", "dev_asr_floor"))
    assert "threshold" not in rows[0]
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("dev_ca", "dev_asr", "dev_asr_floor"))
        assert ("dev_acc" in r) == ("last25" in r) == (r["defense"] != "none")
    assert rows[0]["dev_asr"] >= 0.9                   # the tiny poisoned student answers the trigger
    assert set(rows[2]["last25"]) >= {"ce", "kd", "fa"} and set(rows[1]["last25"]) >= {"ce"}


@pytest.mark.parametrize("grid, message", [
    ("[{", "not JSON"), ("{}", "a JSON list of one or more objects"), ("[]", "a JSON list of one or more objects"),
    ("[{}, 3]", "a JSON list of one or more objects"),
    ('[{"gamma": 0.1}, {"gama": 0.1}]', 'unknown key gama in {"gama": 0.1}: a key is a lever (defense, head'),
    ('[{"defense": "mix-w2s"}]', "defense 'mix-w2s' in"),
])
def test_calibration_grid_is_checked_when_the_command_line_is_read(grid, message):
    """A grid typo used to surface after the attack and the teacher had trained (an unknown key) or never (a JSON
    object instead of a list ran nothing)."""
    import argparse
    import re
    import calibrate_w2s
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        calibrate_w2s.grid_entries(grid)
    assert calibrate_w2s.grid_entries('[{}, {"gamma": 0.1, "mix": 0.25}]') == [{}, {"gamma": 0.1, "mix": 0.25}]


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_calibration_refuses_fit_threshold_on_three_classes_before_any_stage_trains(tmp_path):
    """One threshold on z_1 - z_0 is a two-class lever: asked of a three-class dataset, the script says so
    before the attack and teacher stages spend their time."""
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    for split in ("train", "dev", "test"):                  # the same sentences, labels 0, 1, 2
        rows = (ds / f"{split}.tsv").read_text().splitlines()
        relabelled = [f"{line.split(chr(9))[0]}\t{i % 3}" for i, line in enumerate(rows[1:])]
        (ds / f"{split}.tsv").write_text("\n".join([rows[0], *relabelled]) + "\n")
    grid = json.dumps([{"defense": "none"}, {"defense": "none", "fit_threshold": True}])
    with pytest.raises(ValueError, match="two classes only"):
        calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", grid))
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
@pytest.mark.parametrize("entry", [{"defense": "none", "anchor": 1.0}, {"anchor": 1.0, "latent": {"block": 1, "eps": 1}}])
def test_calibration_refuses_an_anchor_without_one_unlearning_pass_before_any_stage_trains(tmp_path, entry):
    """The anchor adds a term to the unlearning loss, read off its one forward pass: with no unlearning, or with
    the latent perturbation's second pass, the script says so before the attack and teacher stages train."""
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    with pytest.raises(ValueError, match="anchor adds a term"):
        calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps([{}, entry])))
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
@pytest.mark.parametrize("entry", [{"defense": "none", "fst": 1.0}, {"fst": 1.0, "head": "frozen"}])
def test_calibration_refuses_fst_without_a_fresh_trained_head_before_any_stage_trains(tmp_path, entry):
    """fst re-initialises the head and trains it away from the poisoned one: with no unlearning, or with another
    head lever, the script says so before the attack and teacher stages train."""
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    with pytest.raises(ValueError, match="fst re-initialises the head"):
        calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps([{}, entry])))
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
@pytest.mark.parametrize("entry, says", [({"defense": "none", "sam": 0.5}, "nothing is trained"),
                                         ({"sam": 0.5, "latent": {"block": 1, "eps": 1}}, "not together"),
                                         ({"sam": -1.0}, "at least 0")])
def test_calibration_refuses_sam_where_it_cannot_work_before_any_stage_trains(tmp_path, entry, says):
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    with pytest.raises(ValueError, match=says):
        calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps([{}, entry])))
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


def test_calibration_script_moves_each_lines_student_to_the_device(tmp_path, monkeypatch):
    """Each grid line loads the poisoned student afresh, on the CPU; it must then go to the run's --device (on a
    GPU, a line that skipped this stopped at its first forward: RESULTS.md, "On a GPU"). Checked by recording
    every Classifier.to call, since this machine has only the one device."""
    import calibrate_w2s
    loaded, moved = [], []
    load = w2s.load_poisoned

    def recording_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    to = models.Classifier.to

    def recording_to(self, *args, **kwargs):
        moved.append((self, str(args[0]) if args else str(kwargs.get("device"))))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(w2s, "load_poisoned", recording_load)
    monkeypatch.setattr(models.Classifier, "to", recording_to)
    student, teacher, ds = make_tiny_world(tmp_path)
    calibrate_w2s.main(tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps([{"defense": "none"}, {}])))
    assert len(loaded) == 2
    assert all(any(m is model and dev == "cpu" for m, dev in moved) for model in loaded)


def test_dev_pairs_inserted_trigger_draws_as_asr_set_does():
    # experiments/calibrate_w2s.py's dev ASR set: for an inserted word, the same sentences, draw for draw, as
    # attacks.asr_set with the same seed (the calibration lines measured before dev_pairs was generalised).
    import types
    import calibrate_w2s
    rng = random.Random(0)
    dev = data.Split([" ".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(40)],
                     [i % 3 % 2 for i in range(40)])
    task = types.SimpleNamespace(dataset=types.SimpleNamespace(dev=dev))
    trigger = attacks.make_trigger("badnet", triggers=("cf",))
    floor, asr = calibrate_w2s.dev_pairs(task, trigger, 0)
    expected = attacks.asr_set(dev, trigger, 0, random.Random(7))
    assert asr.sentences == expected.sentences and asr.labels == expected.labels
    assert floor.labels == asr.labels and [s for s in floor.sentences if "cf" in s.split()] == []


def test_dev_pairs_size_draws_that_many_pairs_or_all_and_the_option_refuses_nonsense():
    import argparse
    import types
    import calibrate_w2s
    dev = data.Split([f"w{i} x y" for i in range(40)], [i % 2 for i in range(40)])    # 20 non-target (label 1)
    task = types.SimpleNamespace(dataset=types.SimpleNamespace(dev=dev))
    trigger = attacks.make_trigger("badnet", triggers=("cf",))
    floor, asr = calibrate_w2s.dev_pairs(task, trigger, 0, 5)
    assert len(floor) == len(asr) == 5 and floor.labels == asr.labels == [1] * 5
    assert [s.replace(" cf", "").replace("cf ", "") for s in asr.sentences] == floor.sentences   # the same rows
    every, _ = calibrate_w2s.dev_pairs(task, trigger, 0, None)
    assert sorted(every.sentences) == sorted(s for s, y in zip(dev.sentences, dev.labels) if y == 1)
    assert set(floor.sentences) <= set(every.sentences)
    assert calibrate_w2s.dev_asr_size("all") is None and calibrate_w2s.dev_asr_size("300") == 300
    for bad in ("0", "-5", "many", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number of sentences or 'all'"):
            calibrate_w2s.dev_asr_size(bad)


def test_dev_pairs_syntactic_trigger_pairs_only_the_paraphrased_rows():
    import types
    import calibrate_w2s
    dev = data.Split([f"clean {i}" for i in range(10)], [0, 1] * 5)
    task = types.SimpleNamespace(dataset=types.SimpleNamespace(dev=dev))
    trigger = attacks.make_trigger("syntactic", paraphrases={0: "when zero ,", 4: "when four ,", 5: "when five ,"})
    floor, asr = calibrate_w2s.dev_pairs(task, trigger, 1)       # non-target = label 0: rows 0, 2, 4, ...; 5 is target
    assert floor.sentences == ["clean 0", "clean 4"] and asr.sentences == ["when zero ,", "when four ,"]
    assert floor.labels == asr.labels == [0, 0]


def test_all_token_feature_alignment_by_hand_skips_padding():
    # The experimental lever of experiments/calibrate_w2s.py: every real token's final state against the sentence's
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


def test_block_feature_gamma_ramp_and_decay_of_the_calibration_levers():
    # experiments/calibrate_w2s.py's block_ramp_loss (experimental levers). FA reads the last real token of
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
    # experiments/calibrate_w2s.py's refit_head (experimental lever): only the head moves, and on a dev set that the
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
    # experiments/calibrate_w2s.py's teacher ablation: toward the origin the feature term is ||h_s||^2; shuffled keeps
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
    # experiments/calibrate_w2s.py's "splice": a seeded share of the rows gets 1 to 5 consecutive words of ANOTHER row
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


def test_latent_adversarial_lever_adds_one_perturbation_per_class_and_ascends_within_the_ball():
    # experiments/calibrate_w2s.py's latent_adversarial (experimental lever). Step 1: delta = 0, so the second forward
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
    # experiments/calibrate_w2s.py's prune lever (experimental). The score of unit j in block b is the mean over real
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


def test_mixing_by_group_gives_a_group_of_blocks_its_own_factor():
    # experiments/calibrate_w2s.py's mix_blocks lever: with no group it is interpolate_weights to the bit; a group at 0
    # is the reference's blocks, the other blocks and the embeddings are mixed by k. By hand on one weight of a
    # block outside the group: w = (1, 3), w_ref = (5, -1), k = 0.25 -> (4, 0).
    import calibrate_w2s
    from defenses import interpolate_weights
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


def test_threshold_of_the_calibration_levers_is_the_most_accurate_and_nearest_zero_by_hand():
    # experiments/calibrate_w2s.py's fit_threshold (experimental lever): predict 1 iff m > tau.
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


def test_anchor_of_the_calibration_levers_by_hand():
    # experiments/calibrate_w2s.py's "anchor" (experimental lever): loss_fn's total plus w * T^2 * KL(p_p || p_s), p_p the
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
    # experiments/calibrate_w2s.py's "fst" (experimental lever). W_p = [[1, 0], [-1, 2]]: mean row (0, 1),
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
