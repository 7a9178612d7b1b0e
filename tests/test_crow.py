"""CROW (``--defense crow``): the consistency term by hand and against its authors' formula on Hugging Face's
hidden states, the FGSM step, padding, what trains, the cosine schedule, and runs on the tiny world and the quick
preset."""

import json
import math

import pytest
import torch

import defenses
import lora
import models
import train
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_argv, tiny_llama_classifier as tiny_llama

needs_gpt2 = pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
CROW = defenses.DEFENSES["crow"]



# ----------------------------------------------------------------------------------------------
# The consistency term
# ----------------------------------------------------------------------------------------------

def test_layer_consistency_by_hand_on_two_blocks():
    """Two block outputs, one sentence of two tokens: token 0 keeps its direction (1 - cos = 0), token 1 turns by
    45 degrees (1 - cos = 1 - 1/sqrt 2); the mean over the one pair and the two tokens is half of that."""
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])             # (B 1, T 2, d 2)
    h1 = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])             # the length does not count, only the direction
    turn = 1.0 - 1.0 / math.sqrt(2.0)
    assert defenses.layer_consistency([h0, h1], torch.ones(1, 2)).item() == pytest.approx(turn / 2)
    # the mask leaves token 1 out: only token 0, which did not turn
    assert defenses.layer_consistency([h0, h1], torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0)
    # a third output: pairs (h0, h1) and (h1, h2); h2 turns token 0 by 90 degrees (1 - cos = 1) and keeps token 1
    h2 = torch.tensor([[[0.0, 3.0], [2.0, 2.0]]])
    assert defenses.layer_consistency([h0, h1, h2], torch.ones(1, 2)).item() == pytest.approx((turn + 1.0) / 4)
    with pytest.raises(ValueError, match="at least 2"):
        defenses.layer_consistency([h0], torch.ones(1, 2))


def test_block_outputs_are_those_of_blocks_0_to_L_minus_2():
    """CROW compares ``hidden_states[1:-2]`` with ``[2:-1]``: for 4 blocks the outputs of blocks 0, 1, 2 (not the
    embeddings, not the last block's, which only the final norm reads)."""
    clf = tiny_llama(n_layer=4)
    ids, mask = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4)
    with torch.no_grad():
        with defenses.block_outputs(clf.backbone) as states:
            clf(ids, mask)
        expected = [clf.backbone.hidden_states(ids, mask, layer=i) for i in range(3)]
    assert len(states) == 3
    for got, want in zip(states, expected):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="3 blocks or more"):
        with defenses.block_outputs(tiny_llama(n_layer=2).backbone):
            pass


def test_consistency_is_crows_formula_on_hugging_faces_hidden_states(tmp_path):
    """Parity with the authors' code: ``1 - cos(stack(hs[1:-2]), stack(hs[2:-1]))``, averaged over everything, on
    a Hugging Face Llama's ``output_hidden_states``, equals ours on the same weights (no padding)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    ref.save_pretrained(tmp_path)
    ours, _ = models.load_decoder(tmp_path)
    ids = torch.randint(0, 103, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
        theirs = (1 - torch.nn.functional.cosine_similarity(torch.stack(hs[1:-2]), torch.stack(hs[2:-1]), dim=-1,
                                                            eps=1e-8)).mean()
        with defenses.block_outputs(ours) as states:
            ours.hidden_states(ids, torch.ones(3, 9))
        mine = defenses.layer_consistency(states, torch.ones(3, 9))
    assert len(states) - 1 == len(hs[1:-2]) == 3                  # pairs: L - 2 of L = 5 blocks
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_padding_does_not_change_the_masked_term():
    """Right padding: a sentence alone and the same sentence padded among a longer one give the same masked term,
    token-weighted: C(batch) * (n1 + n2) = C(s1) * n1 + C(s2) * n2. Unmasked, the pads would count."""
    clf = tiny_llama()
    s1, s2 = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    batch = train.collate(train.Encoded([s1, s2], torch.tensor([0, 1]), pad_id=0), [0, 1]).inputs()

    def term(ids, mask):
        with torch.no_grad(), defenses.block_outputs(clf.backbone) as states:
            clf.backbone.hidden_states(ids, mask)
        return defenses.layer_consistency(states, mask)
    together = term(batch["input_ids"], batch["attention_mask"])
    alone = [term(torch.tensor([s]), torch.ones(1, len(s))) for s in (s1, s2)]
    torch.testing.assert_close(together * 9, alone[0] * 3 + alone[1] * 6, atol=1e-5, rtol=0)
    unmasked = term(batch["input_ids"], torch.ones_like(batch["attention_mask"]))
    assert abs(unmasked * 12 - (alone[0] * 3 + alone[1] * 6)) > 1e-3


# ----------------------------------------------------------------------------------------------
# The FGSM step and the loss
# ----------------------------------------------------------------------------------------------

def test_fgsm_step_has_the_gradients_sign_and_size_eps():
    e = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    loss = (e * torch.tensor([[3.0, -0.1, 0.0]])).sum() + (e ** 2).sum()      # dL/de = [5, -4.1, 1]
    x = defenses.fgsm_embeddings(e, loss, eps=0.1)
    assert torch.allclose(x, torch.tensor([[1.1, -2.1, 0.6]]))
    assert not x.requires_grad
    loss.backward()                                    # the graph was kept for the caller's backward
    assert e.grad is not None


def test_the_nudge_raises_the_consistency_term_and_the_loss_holds_the_nudged_one():
    """On a tiny model: the perturbed term is larger than the clean one (the step goes uphill), the loss is
    CE + weight * perturbed term, and its gradient reaches the LoRA, not the embeddings or the head."""
    clf = tiny_llama()
    CROW.add_adapters(clf, w2s.UnlearnConfig(**CROW.recipe))
    with torch.no_grad():                              # LoRA's B starts at 0: give it a value, so it has a gradient
        for name, p in clf.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.01, generator=torch.Generator().manual_seed(3))
    batch = train.collate(train.Encoded([[5, 6, 7, 8], [9, 10]], torch.tensor([0, 1]), pad_id=0), [0, 1])
    loss, terms = defenses.crow_loss(eps=0.1, weight=5.5)(clf, batch)
    assert terms["cons_adv"] > terms["cons"] > 0
    assert loss.item() == pytest.approx(terms["ce"] + 5.5 * terms["cons_adv"], rel=1e-5)
    loss.backward()
    trained = {n for n, p in clf.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".A", ".B")) for n in trained)
    assert {n.split(".")[-2] for n in trained} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    plain, terms = defenses.crow_loss(eps=0.1, weight=0.0)(clf, batch)          # the control: CE alone
    assert set(terms) == {"ce"} and plain.item() == pytest.approx(terms["ce"])


def test_cosine_schedule_warms_up_then_falls_as_half_a_cosine():
    got = [train.cosine_schedule(s, 10, 2) for s in range(11)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert got == pytest.approx(want)
    assert got[2] == 1.0 and got[6] == pytest.approx(0.5) and got[10] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        train.fit(tiny_llama(), None, None, train.FitConfig(schedule="step"))


def test_keeping_the_last_step_reads_dev_but_restores_nothing():
    """``keep="last"`` (CROW's recipe): four readings are logged, and the weights are those after the last step,
    the same as a run read only at its end; ``best_step`` is the last step."""
    data = train.Encoded([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]] * 4, torch.tensor([0, 1, 0, 1] * 4), pad_id=0)

    def run(**cfg):
        clf = tiny_llama()
        cfg = train.FitConfig(epochs=1.0, lr=1e-2, batch_size=4, **cfg)
        return clf, train.fit(clf, data, data, cfg, progress=False)
    last, fit = run(keep="last", evals_per_epoch=4)
    once, _ = run(evals_per_epoch=1)
    assert len(fit.dev_history) == 4 and fit.best_step == fit.steps == 4
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), once.state_dict().values()))
    with pytest.raises(ValueError, match="keep is 'best' or 'last'"):
        train.fit(tiny_llama(), data, data, train.FitConfig(keep="first"))


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

@needs_gpt2
def test_crow_runs_end_to_end_on_the_tiny_world(tmp_path, monkeypatch):
    """The rows stand beside the control and W2SDefense; CROW trains its recipe on its 100 (here 16) clean
    sentences with a frozen head, logs both consistency terms, and its stage reloads to the model tested."""
    monkeypatch.setitem(defenses.Crow.recipe, "clean_size", 16)
    monkeypatch.setattr(defenses.CrowFineTune, "recipe", {**defenses.Crow.recipe, "lr": 2e-4})
    student, teacher, ds = make_tiny_world(tmp_path, student_blocks=4)
    args = w2s.parser().parse_args(tiny_argv(tmp_path, student, teacher, ds, "--defense", "crow",
                                                     "--lora-layers", "2"))
    result = w2s.run(args)
    assert [r["model"] for r in result["rows"]] == ["poisoned", "lora", "w2sdefense", "crow-lora", "crow"]
    folder = next((tmp_path / "stages").glob("crow-[0-9a-f]*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    assert metrics["steps"] == len(history) == 5 * 2             # 16 sentences, batch 8, 5 epochs
    assert all(h["cons_adv"] >= 0 and "cons" in h for h in history)
    assert metrics["weights"]["eps"] == 0.1 and metrics["weights"]["head"] == "frozen"
    assert metrics["best_step"] == metrics["steps"] and len(metrics["dev_history"]) == 5     # kept the last step
    plain = json.loads((next((tmp_path / "stages").glob("crow-lora-*")) / "history.json").read_text())
    assert plain and not any("cons" in h for h in plain)

    a, t, u, eval_size = w2s.resolve_configs(args)
    task = w2s.build_task(a, eval_size)
    ctx = w2s.context(a, t, u, task, next((tmp_path / "stages").glob("attack-*")), None, "cpu")
    model, tokenizer = CROW.reload(ctx, folder)
    poisoned, _ = ctx.load_poisoned()
    assert torch.equal(model.head.weight, poisoned.head.weight)                  # the head stayed frozen
    trained = lora.lora_state_dict(model)                 # --lora-layers 2: every linear of blocks 2 and 3
    assert {n.split(".")[2] for n in trained} == {"2", "3"} and all(n.endswith((".A", ".B")) for n in trained)
    assert {n.split(".")[-2] for n in trained} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}
    test = train.encode_for(model, tokenizer, task.test, a.max_length, 0, "cpu")
    assert train.accuracy(train.predict(model, test), test.labels) == result["rows"][-1]["ca"]
    again = w2s.run(args)                                         # cached: the same stages, untouched
    assert again["rows"] == result["rows"]


@pytest.mark.long
def test_quick_preset_runs_crow_end_to_end(quick_stages, real_weights, tmp_path):
    """``--preset quick --defense crow`` on the open weights: its rows beside the control and W2SDefense on the
    same cached student and teacher, within the quick budget."""
    args = w2s.parser().parse_args(["--attack", "badnet", "--preset", "quick", "--seed", "0", "--precision", "fp32",
                                    "--defense", "crow", "--stages", str(quick_stages), "--out", str(tmp_path / "run")])
    result = w2s.run(args)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["poisoned", "lora", "w2sdefense", "crow-lora", "crow"]
    assert all(0.0 <= rows[name][k] <= 1.0 for name in ("crow-lora", "crow") for k in ("ca", "asr", "asr_floor"))
    assert result["seconds"]["crow-lora"] + result["seconds"]["crow"] < 240, result["seconds"]
