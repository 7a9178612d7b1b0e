"""MuScleLoRA (``--defense muscle``): the multi-scale head branch and the gradient alignment by hand, the clean
reference set's disjointness, the settings it refuses, its stage key, and a run on the tiny world."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import attacks
import checks
import data
import defenses
import lora
import stages
import train
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_argv

needs_gpt2 = pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
MUSCLE = defenses.DEFENSES["muscle"]


# ----------------------------------------------------------------------------------------------
# The multi-scale low-rank branch (lora.MultiScaleLowRank)
# ----------------------------------------------------------------------------------------------

def hand_mslr(scales=(1, 2), alpha=2.0) -> lora.MultiScaleLowRank:
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = lora.MultiScaleLowRank(base, scales=scales, inner_rank=1, alpha=alpha)
    with torch.no_grad():
        layer.L.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))          # (2 scales, in 3)
        layer.R.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))                   # (out 2, 2 scales)
    return layer


def test_mslr_by_hand_on_a_2x3_layer_with_two_scales():
    layer = hand_mslr()
    assert layer.K.tolist() == [1.0, 2.0] and layer.scaling == 2.0              # alpha / r_in = 2 / 1
    # x = (1, 2, 3): W0 x + b0 = (1 - 3, 2) + (0.5, -0.5) = (-1.5, 1.5); L x = (1, 5); K * L x = (1, 10);
    # R (1, 10) = (1, 1 - 10) = (1, -9); times 2: (2, -18); y = (0.5, -16.5).
    # x = (1, 0, 0): W0 x + b0 = (1.5, -0.5); L x = (1, 0); R (1, 0) = (1, 1); times 2: (2, 2); y = (3.5, 1.5).
    y = layer(torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(y, torch.tensor([[0.5, -16.5], [3.5, 1.5]]))
    # the branch's matrix: 2 * R diag(1, 2) L = 2 * R [[1, 0, 0], [0, 2, 2]] = [[2, 0, 0], [2, -4, -4]]
    assert torch.equal(layer.delta_weight(), torch.tensor([[2.0, 0.0, 0.0], [2.0, -4.0, -4.0]]))
    assert (layer.in_features, layer.out_features) == (3, 2)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["L", "R"]
    assert "K" not in layer.state_dict()                                          # a constant, rebuilt, not saved


def test_mslr_repeats_each_scale_inner_rank_times_and_starts_non_zero():
    layer = lora.MultiScaleLowRank(nn.Linear(6, 3), scales=(1, 2, 3, 4), inner_rank=2, alpha=4.0,
                                   generator=torch.Generator().manual_seed(0))
    assert layer.K.tolist() == [1, 1, 2, 2, 3, 3, 4, 4] and layer.scaling == 2.0
    assert layer.L.shape == (8, 6) and layer.R.shape == (3, 8)
    assert layer.delta_weight().abs().sum() > 0                                   # L, R kaiming: not zero at init
    again = lora.MultiScaleLowRank(nn.Linear(6, 3), scales=(1, 2, 3, 4), inner_rank=2, alpha=4.0,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.L, again.L) and torch.equal(layer.R, again.R)      # seeded
    with pytest.raises(ValueError, match="scales"):
        lora.MultiScaleLowRank(nn.Linear(6, 3), scales=())


def test_mslr_with_one_scale_k1_is_lora_and_w0_never_changes_after_a_step():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    mslr = lora.MultiScaleLowRank(base, scales=(1,), inner_rank=2, alpha=4.0,
                                  generator=torch.Generator().manual_seed(1))
    plain = lora.LoRALinear(nn.Linear(5, 3), r=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        plain.base.weight.copy_(base.weight)
        plain.base.bias.copy_(base.bias)
        plain.A.copy_(mslr.L)
        plain.B.copy_(mslr.R)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    assert torch.equal(mslr(x), plain(x))
    for layer in (mslr, plain):                                # one AdamW step each, no alignment
        params = [p for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
        nn.functional.cross_entropy(layer(x), y).backward()
        opt.step()
    assert torch.equal(mslr(x), plain(x))
    assert torch.equal(mslr.L, plain.A) and torch.equal(mslr.R, plain.B)
    assert torch.equal(base.weight, w0) and torch.equal(base.bias, b0) and base.weight.grad is None


# ----------------------------------------------------------------------------------------------
# Gradient alignment (defenses.align_gradients, defenses.GradientAlignment)
# ----------------------------------------------------------------------------------------------

def test_gradient_alignment_by_hand():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 5.0])]
    r = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, -2.0])]
    out, aligned = defenses.align_gradients(g, r)
    assert aligned
    assert torch.equal(out[0], torch.tensor([1.0, 0.0]))          # <g, r> = 1, ||r||^2 = 1: 1 * r
    assert torch.equal(out[1], torch.tensor([3.0, 0.0]))          # <g, r> = -6 < 0: |-6| / 4 * r = 1.5 r, along +r
    assert out[2] is g[2]                                         # r = 0: the tensor is skipped, g kept
    assert torch.equal(out[3], torch.tensor([0.0, -5.0]))         # <g, r> = -10: 10 / 4 * r = (0, -5), along +r
    # a reference gradient too small to square in float32 still gives a finite gradient of the right size
    tiny, = defenses.align_gradients([torch.tensor([3.0, 4.0])], [torch.tensor([1e-30, 0.0])], min_ref_norm=0.0)[0]
    assert torch.equal(tiny, torch.tensor([3.0, 0.0]))
    # a missing gradient on either side leaves the tensor alone
    out, aligned = defenses.align_gradients([None, g[0]], [r[0], None])
    assert out == [None, g[0]] and aligned


def test_gradient_alignment_threshold_is_on_the_mean_reference_norm():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    # mean ||r|| = (2 + 0) / 2 = 1: at most the threshold 1, nothing replaced, although one tensor's r is 2
    out, aligned = defenses.align_gradients(g, [torch.tensor([2.0, 0.0]), torch.zeros(2)], min_ref_norm=1.0)
    assert not aligned and all(a is b for a, b in zip(out, g))
    # mean ||r|| = (2 + 1) / 2 = 1.5 > 1: replaced
    out, aligned = defenses.align_gradients(g, [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])], min_ref_norm=1.0)
    assert aligned and torch.equal(out[0], torch.tensor([1.0, 0.0])) and torch.equal(out[1], torch.tensor([0.0, 4.0]))
    # the authors' threshold, 5e-7
    assert defenses.MIN_REF_GRAD_NORM == MUSCLE.min_ref_grad_norm == 5e-7
    assert not defenses.align_gradients(g[:1], [torch.tensor([4.9e-7, 0.0])])[1]
    assert defenses.align_gradients(g[:1], [torch.tensor([5.1e-7, 0.0])])[1]


class Bag(nn.Module):
    """A bag of embeddings and a head: enough of a model for ``train.fit`` and the alignment hook."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))


def test_the_hook_replaces_each_gradient_by_its_alignment_with_the_reference_batch():
    torch.manual_seed(0)
    model = Bag()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = train.collate(train.Encoded([[1, 2], [3], [4, 5, 6]], torch.tensor([0, 1, 0]), pad_id=0), [0, 1, 2])
    reference = train.Encoded([[2, 7], [5, 5, 1]], torch.tensor([1, 0]), pad_id=0)
    loss, _ = train.cross_entropy_loss(model, batch)
    loss.backward()
    g = [p.grad.clone() for p in params]
    ref_loss, _ = train.cross_entropy_loss(model, train.collate(reference, [0, 1]))
    r = torch.autograd.grad(ref_loss, params)
    hook = defenses.GradientAlignment(reference, batch_size=16, seed=0, device="cpu", bf16=False)
    terms = hook(model, params)                      # the batch is the whole 2-sentence reference set
    assert terms["aligned"] == 1.0 and terms["ref_ce"] == pytest.approx(ref_loss.item(), rel=1e-6)
    for p, g_i, r_i in zip(params, g, r):
        want = (g_i * r_i).sum().abs() / (r_i * r_i).sum() * r_i
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)


def test_fit_calls_before_step_after_backward_and_before_the_update():
    torch.manual_seed(0)
    model = Bag()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = train.Encoded([[1, 2], [3], [4, 5, 6], [7]], torch.tensor([0, 1, 0, 1]), pad_id=0)
    seen = []

    def zero(m, params):                              # gradients already there; zeroing them stops every update
        seen.append(all(p.grad is not None for p in params))
        for p in params:
            p.grad.zero_()
        return {"hooked": 1.0}
    cfg = train.FitConfig(epochs=2, lr=0.1, batch_size=2, weight_decay=0.0)
    fit = train.fit(model, tr, tr, cfg, progress=False, before_step=zero)
    assert seen == [True] * 4 and all(h["hooked"] == 1.0 for h in fit.history)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------
# The clean reference set
# ----------------------------------------------------------------------------------------------

def toy_dataset() -> data.Dataset:
    dev = data.Split([f"dev {i}" for i in range(10)] + ["shared a", "shared b"], [i % 2 for i in range(12)])
    test = data.Split(["shared a", "shared b", "test 0"], [0, 1, 0])
    return data.Dataset("toy", data.Split(["train"], [0]), dev, test, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_set_is_disjoint_from_selection_dev_and_from_test(seed):
    ds = toy_dataset()
    reference, selection = defenses.reference_split(ds, ds.dev, 4, seed)
    assert len(reference) == 4 and len(selection) == len(ds.dev) - 4
    assert not set(reference.sentences) & set(selection.sentences)
    assert not set(reference.sentences) & set(ds.test.sentences)                  # "shared a/b" never drawn
    assert sorted(reference.sentences + selection.sentences) == sorted(ds.dev.sentences)
    assert all(ds.dev.labels[ds.dev.sentences.index(s)] == y for s, y in zip(reference.sentences, reference.labels))
    # a subset of dev selects (the quick preset's dev_size): the reference is drawn from the whole dev split and
    # taken out of that subset where they meet
    sub = data.Split(ds.dev.sentences[:6], ds.dev.labels[:6])
    reference, selection = defenses.reference_split(ds, sub, 4, seed)
    assert not set(reference.sentences) & set(selection.sentences)
    assert set(selection.sentences) == set(sub.sentences) - set(reference.sentences)


def test_reference_set_larger_than_the_dev_set_is_an_error():
    ds = toy_dataset()
    defenses.reference_split(ds, ds.dev, 9, 0)
    with pytest.raises(ValueError, match="10 dev sentences"):                       # 12 dev, 2 of them in test
        defenses.reference_split(ds, ds.dev, 11, 0)
    with pytest.raises(ValueError, match="1 to the"):
        defenses.reference_split(ds, ds.dev, 0, 0)
    with pytest.raises(ValueError, match="must leave some"):                      # the 10 it may draw are all of
        defenses.reference_split(ds, data.Split(ds.dev.sentences[:10], ds.dev.labels[:10]), 10, 0)   # selection's


# ----------------------------------------------------------------------------------------------
# Settings: its budget, what it refuses, its stage key
# ----------------------------------------------------------------------------------------------

def resolve(*argv):
    return w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32", "--defense", "muscle", *argv]))


def test_budget_is_the_authors_lora_and_the_users_options_win():
    for preset in ("quick", "cpu", "paper"):
        _, _, u, _ = resolve("--preset", preset)
        assert (u.rank, u.lora_alpha, u.lora_dropout, u.targets) == (2, 8.0, 0.0, ("q_proj", "v_proj"))
        # chosen on dev for our student; the paper preset keeps the authors' for theirs
        want = (5.0, 1e-5, 16, 1) if preset == "paper" else (0.6, 3e-3, 16, 4)
        assert (u.epochs, u.lr, u.batch_size, u.evals_per_epoch) == want
        assert (u.alpha, u.beta, u.gamma, u.clean_size) == (1.0, 0.0, 0.0, None)
        assert u.lora_layers == (6 if preset == "quick" else None)      # every block; quick's top 6 as every stage
    _, _, u, _ = resolve("--epochs", "3", "--lr", "1e-4", "--rank", "4")
    assert (u.epochs, u.lr, u.rank) == (3.0, 1e-4, 4)
    _, _, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32"]))
    assert (u.rank, u.epochs, u.gamma) == (512, 2.0, 0.05)                    # other defenses keep the preset's


@pytest.mark.parametrize("flag, value", [("--alpha", "2"), ("--beta", "0.01"), ("--gamma", "0.1"),
                                         ("--fa", "normalized"), ("--weights", "authors"), ("--clean-size", "32")])
def test_the_unlearning_defenses_settings_are_refused(flag, value):
    a, t, u, _ = resolve(flag, value)
    with pytest.raises(SystemExit, match=f"error: {flag} is a setting of the unlearning defenses"):
        checks.check_configs(a, t, u, "muscle", None)


def test_stage_key_holds_what_it_reads_and_not_what_it_does_not():
    a, t, u, _ = resolve()
    task = attacks.Task(None, None, 0, None, data.Split([], []), None, None)

    def key(a=a, u=u, t=t):
        ctx = defenses.Context(a, u, t, task, "cpu", None, None, None)
        return stages.config_key(*MUSCLE.key_parts(ctx))
    base = key()
    for changed in (dict(u=dataclasses.replace(u, lr=2e-5)), dict(u=dataclasses.replace(u, seed=1)),
                    dict(u=dataclasses.replace(u, rank=4)), dict(a=dataclasses.replace(a, poison_rate=0.2)),
                    dict(a=dataclasses.replace(a, student="gpt2")), dict(a=dataclasses.replace(a, dev_size=50))):
        assert key(**changed) != base, changed
    for same in (dict(t=dataclasses.replace(t, epochs=9.0)), dict(a=dataclasses.replace(a, epochs=9.0)),
                 dict(a=dataclasses.replace(a, train_layers=3))):
        assert key(**same) == base, same                       # the teacher and the attacker's training: unread
    with pytest.MonkeyPatch.context() as m:
        m.setattr(defenses.MuScleLoRA, "ref_size", 64)
        assert key() != base
    assert MUSCLE.key_parts(defenses.Context(a, u, t, task, "cpu", None, None, None))[-1]["muscle"]["scales"] == \
        [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# End to end on the tiny world
# ----------------------------------------------------------------------------------------------

def muscle_args(tmp_path, student, teacher, ds, *extra):
    argv = tiny_argv(tmp_path, student, teacher, ds, "--defense", "muscle", *extra)
    i = argv.index("--clean-size")                          # an unlearning setting: muscle refuses it
    return w2s.parser().parse_args(argv[:i] + argv[i + 2:])


@needs_gpt2
def test_a_reference_set_larger_than_the_dev_set_fails_before_any_training(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)           # 24 dev sentences, fewer than 128
    with pytest.raises(SystemExit, match="clean reference set of 128 sentences"):
        w2s.run(muscle_args(tmp_path, student, teacher, ds))
    assert not (tmp_path / "stages").exists()


@needs_gpt2
def test_muscle_runs_end_to_end_on_the_tiny_world(tmp_path, monkeypatch):
    """From the pretrained student on the poisoned set: the table has the poisoned row and MuScleLoRA's, no
    teacher is trained, every step logs the alignment, W0 is the pretrained student's fresh head after training,
    and the saved stage reloads to the model that was tested."""
    monkeypatch.setattr(defenses.MuScleLoRA, "ref_size", 8)
    student, teacher, ds = make_tiny_world(tmp_path)
    result = w2s.run(muscle_args(tmp_path, student, teacher, ds))
    assert [r["model"] for r in result["rows"]] == ["poisoned", "muscle-lora", "muscle"]
    assert result["teacher_ca"] is None
    folder = next((tmp_path / "stages").glob("muscle-[0-9a-f]*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    assert metrics["steps"] == len(history) > 0 and metrics["weights"]["ref_size"] == 8
    assert all(h["aligned"] == 1.0 and h["ref_ce"] > 0 for h in history)

    args = muscle_args(tmp_path, student, teacher, ds)
    a, t, u, eval_size = w2s.resolve_configs(args)
    task = w2s.build_task(a, eval_size)
    ctx = w2s.context(a, t, u, task, None, None, "cpu")
    model, tokenizer = MUSCLE.reload(ctx, folder)
    fresh, _ = ctx.load_pretrained()
    assert isinstance(model.head, lora.MultiScaleLowRank) and torch.equal(model.head.base.weight, fresh.head.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad} - {"head.L", "head.R"}
    assert {n.rsplit(".", 2)[-2:][0] + "." + n[-1] for n in trainable} == {"q_proj.A", "q_proj.B", "v_proj.A",
                                                                            "v_proj.B"}
    assert all(n.startswith("backbone.blocks.1.") for n in trainable)           # --lora-layers 1: the top block
    reference, selection = MUSCLE.reference_split(ctx)
    assert len(reference) == 8 and len(selection) == len(task.dev) - 8
    frozen = train.frozen_blocks(model, u.lora_layers)
    test = train.encode_for(model, tokenizer, task.test, a.max_length, frozen, "cpu")
    ca = train.accuracy(train.predict(model, test), test.labels)
    assert ca == result["rows"][2]["ca"]
    again = w2s.run(muscle_args(tmp_path, student, teacher, ds))            # cached: the same stage, untouched
    assert again["rows"] == result["rows"]

    # The ablation beside it: the same LoRA and steps, the head trained as it is, no alignment.
    plain = defenses.DEFENSES["muscle-lora"]
    folder = next((tmp_path / "stages").glob("muscle-lora-*"))
    history = json.loads((folder / "history.json").read_text())
    assert history and not any("aligned" in h for h in history)
    model, tokenizer = plain.reload(ctx, folder)
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight.requires_grad
    assert not torch.equal(model.head.weight, fresh.head.weight)                 # the head was trained
    test = train.encode_for(model, tokenizer, task.test, a.max_length, frozen, "cpu")
    assert train.accuracy(train.predict(model, test), test.labels) == result["rows"][1]["ca"]


@needs_gpt2
def test_muscle_mslr_ablation_keeps_the_branch_and_drops_the_alignment(tmp_path, monkeypatch):
    monkeypatch.setattr(defenses.MuScleLoRA, "ref_size", 8)
    student, teacher, ds = make_tiny_world(tmp_path)
    args = muscle_args(tmp_path, student, teacher, ds)
    args.defense = "muscle-mslr"
    result = w2s.run(args)
    assert [r["model"] for r in result["rows"]] == ["poisoned", "muscle-lora", "muscle-mslr"]
    folder = next((tmp_path / "stages").glob("muscle-mslr-*"))
    assert not any("aligned" in h for h in json.loads((folder / "history.json").read_text()))
    assert json.loads((folder / "metrics.json").read_text())["weights"]["scales"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_quick_preset_runs_muscle_end_to_end(quick_stages, real_weights, tmp_path):
    """``--preset quick --defense muscle`` on the open weights: MuScleLoRA and its ablation train from the
    pretrained student on the quick preset's poisoned set, within the quick budget. (How well they learn is not
    asserted: the settings were chosen on the cpu preset's dev set, and the quick preset's 600 rows give 23 steps.)"""
    args = w2s.parser().parse_args(["--attack", "badnet", "--preset", "quick", "--seed", "0", "--precision", "fp32",
                                    "--defense", "muscle", "--stages", str(quick_stages), "--out", str(tmp_path / "run")])
    result = w2s.run(args)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["poisoned", "muscle-lora", "muscle"] and result["teacher_ca"] is None
    assert all(0.0 <= rows[name][k] <= 1.0 for name in ("muscle-lora", "muscle") for k in ("ca", "asr", "asr_floor"))
    for name in ("muscle-lora", "muscle"):
        folder = next(quick_stages.glob(f"{name}-[0-9a-f]*[0-9a-f]"))
        assert json.loads((folder / "metrics.json").read_text())["steps"] > 0
    # the quick preset's budget: the whole pipeline in about 5 minutes on a 2-core CPU
    assert result["seconds"]["muscle-lora"] + result["seconds"]["muscle"] < 300, result["seconds"]
