"""BEEAR-style unlearning (``--defense beear``): where the drift goes, that a zero drift changes nothing, that the
inner level finds a drift, that the outer level trains only LoRA and the head, and runs on the tiny world and the
quick preset."""

import json
import random

import pytest
import torch

import defenses
import lora
import losses
import train
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_argv, tiny_llama_classifier as tiny_llama

needs_gpt2 = pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
BEEAR = defenses.DEFENSES["beear"]



# ----------------------------------------------------------------------------------------------
# Where the drift goes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_the_drift_lands_on_exactly_the_last_n_real_tokens(side):
    """Rows of 4, 2 and 1 real tokens, n = 2: the last two real tokens of each get delta[0] then delta[1] (the one
    the head reads gets delta[1]); the one-token row gets delta[1] only; pads and earlier tokens get nothing."""
    data = train.Encoded([[1, 2, 3, 4], [5, 6], [7]], torch.tensor([0, 1, 0]), pad_id=0, padding_side=side)
    batch = train.collate(data, [0, 1, 2])
    x = torch.zeros(3, 4, 2)
    delta = torch.tensor([[1.0, 10.0], [2.0, 20.0]])
    got = defenses.add_at_last_tokens(x, delta, batch.attention_mask)
    want = torch.zeros(3, 4, 2)
    real = [[0, 1, 2, 3], [0, 1], [0]] if side == "right" else [[0, 1, 2, 3], [2, 3], [3]]
    for r, cols in enumerate(real):
        want[r, cols[-1]] = delta[1]
        if len(cols) > 1:
            want[r, cols[-2]] = delta[0]
    assert torch.equal(got, want)


def test_a_zero_drift_leaves_the_logits_bit_identical():
    clf = tiny_llama()
    batch = train.collate(train.Encoded([[3, 4, 5], [6, 7, 8, 9, 10]], torch.tensor([0, 1]), pad_id=0), [0, 1])
    with torch.no_grad():
        plain = clf(**batch.inputs())
        with defenses.drift_after(clf.backbone, 1, torch.zeros(3, 32), batch.attention_mask):
            drifted = clf(**batch.inputs())
    assert torch.equal(plain, drifted)


def test_the_drift_reaches_a_forward_from_a_cached_prefix():
    """A cached prefix of block + 1 blocks ends where the drift goes in: the same logits as the full forward."""
    clf = tiny_llama()
    data = train.Encoded([[3, 4, 5], [6, 7, 8, 9, 10]], torch.tensor([0, 1]), pad_id=0)
    delta = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    full, cached = train.collate(data, [0, 1]), train.collate(train.cache_prefix(clf, data, 2), [0, 1])
    with torch.no_grad():
        with defenses.drift_after(clf.backbone, 1, delta, full.attention_mask):
            z_full = clf(**full.inputs())
        with defenses.drift_after(clf.backbone, 1, delta, cached.attention_mask):
            z_cached = clf(**cached.inputs())
    torch.testing.assert_close(z_cached, z_full, atol=1e-6, rtol=0)
    assert not torch.allclose(z_full, clf(**full.inputs()).detach())            # and the drift did something
    with pytest.raises(ValueError, match="after block 0 to 2"):
        with defenses.drift_after(clf.backbone, 3, delta, full.attention_mask):
            pass


# ----------------------------------------------------------------------------------------------
# The two levels
# ----------------------------------------------------------------------------------------------

def clean_set(n: int = 24) -> train.Encoded:
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(1, 50, (int(k),), generator=g).tolist() for k in torch.randint(2, 8, (n,), generator=g)]
    return train.Encoded(ids, torch.tensor([i % 2 for i in range(n)]), pad_id=0)


def test_the_inner_level_lowers_its_loss_and_leaves_the_weights_alone():
    clf = tiny_llama()
    data = clean_set()
    rows = [i for i in range(len(data)) if data.labels[i] != 1]
    batch = train.collate(data, rows)

    def inner_loss(delta):
        with torch.no_grad(), defenses.drift_after(clf.backbone, 1, delta, batch.attention_mask):
            return losses.cross_entropy(clf(**batch.inputs()), torch.ones(len(rows), dtype=torch.long))
    delta, flip = defenses.find_drift(clf, data, rows, 1, block=1, n=2, steps=20, lr=0.5, batch_size=len(rows),
                                      rng=random.Random(0), read=rows)
    assert delta.shape == (2, 32) and not delta.requires_grad
    assert inner_loss(delta) < inner_loss(torch.zeros(2, 32))
    assert 0.0 <= flip <= 1.0
    assert all(p.grad is None for p in clf.parameters())


def test_the_outer_level_trains_only_lora_and_the_head():
    clf = tiny_llama()
    cfg = w2s.UnlearnConfig(rank=4, lora_alpha=4.0, lora_layers=2)
    defenses.add_lora(clf, cfg)
    data = clean_set()
    adversary = defenses.DriftAdversary(data, 2, block=1, n=2, inner_steps=3, inner_lr=0.1, round_steps=2,
                                        batch_size=8, seed=0)
    batch = train.collate(data, list(range(8)))
    loss, terms = adversary(clf, batch)
    assert loss.item() == pytest.approx(terms["ce"] + terms["ce_drift"], rel=1e-6)
    assert len(adversary.rounds) == 1 and adversary.rounds[0]["guess"] in (0, 1)
    loss.backward()
    trained = {n for n, p in clf.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in clf.named_parameters() if p.requires_grad}
    assert all(n.startswith("head.") or n.endswith((".A", ".B")) for n in trained) and "head.weight" in trained
    adversary(clf, batch)
    adversary(clf, batch)                                         # step 2: a new round searches again
    assert [r["step"] for r in adversary.rounds] == [0, 2]


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

@needs_gpt2
def test_beear_runs_end_to_end_on_the_tiny_world(tmp_path, monkeypatch):
    for name, value in (("block", 1), ("n", 2), ("inner_steps", 3), ("rounds", 2)):
        monkeypatch.setattr(defenses.Beear, name, value)
    student, teacher, ds = make_tiny_world(tmp_path, student_blocks=4)     # the drift goes after block 1
    args = w2s.parser().parse_args(tiny_argv(tmp_path, student, teacher, ds, "--defense", "beear",
                                             "--lora-layers", "2"))
    result = w2s.run(args)
    assert [r["model"] for r in result["rows"]] == ["poisoned", "lora", "w2sdefense", "beear"]
    folder = next((tmp_path / "stages").glob("beear-[0-9a-f]*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["found"]["target_guess"] in (0, 1) and len(metrics["found"]["rounds"]) == 2
    assert metrics["weights"]["block"] == 1
    history = json.loads((folder / "history.json").read_text())
    assert all("ce_drift" in h for h in history)

    a, t, u, eval_size = w2s.resolve_configs(args)
    task = w2s.build_task(a, eval_size)
    ctx = w2s.context(a, t, u, task, next((tmp_path / "stages").glob("attack-*")), None, "cpu")
    model, tokenizer = BEEAR.reload(ctx, folder)
    assert {n.split(".")[2] for n in lora.lora_state_dict(model) if n.startswith("backbone.")} == {"2", "3"}
    test = train.encode_for(model, tokenizer, task.test, a.max_length, 0, "cpu")
    assert train.accuracy(train.predict(model, test), test.labels) == result["rows"][-1]["ca"]


@pytest.mark.long
def test_quick_preset_runs_beear_end_to_end(quick_stages, real_weights, tmp_path):
    args = w2s.parser().parse_args(["--attack", "badnet", "--preset", "quick", "--seed", "0", "--precision", "fp32",
                                    "--defense", "beear", "--stages", str(quick_stages), "--out", str(tmp_path / "run")])
    result = w2s.run(args)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["poisoned", "lora", "w2sdefense", "beear"]
    assert 0.0 <= rows["beear"]["ca"] <= 1.0
    folder = next(quick_stages.glob("beear-[0-9a-f]*[0-9a-f]"))
    assert json.loads((folder / "metrics.json").read_text())["found"]["target_guess"] in (0, 1)
    assert result["seconds"]["beear"] < 240, result["seconds"]
