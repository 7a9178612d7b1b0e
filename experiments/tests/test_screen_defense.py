"""experiments/screen_defense.py: a grid of the defenses' own settings on the tiny world (one JSON line per entry,
after the poisoned student's), the authors' MuScleLoRA head, and the checks of a grid entry before any work."""

import json

import pytest
import torch

import defenses
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_argv, tiny_llama_classifier

needs_gpt2 = pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")


@needs_gpt2
def test_screen_runs_each_entry_on_the_tiny_world_one_json_line_each(tmp_path, capsys, monkeypatch):
    import screen_defense
    monkeypatch.setattr(defenses.MuScleLoRA, "ref_size", 8)
    student, teacher, ds = make_tiny_world(tmp_path, student_blocks=4)     # CROW and BEEAR need 3 blocks or more
    grid = [{"defense": "crow", "set": {"eps": 0.05, "recipe": {"clean_size": 16, "epochs": 1}}},
            {"defense": "beear", "set": {"block": 1, "n": 2, "inner_steps": 2, "rounds": 1}},
            {"defense": "muscle", "head": "theirs", "lr": 1e-3}]
    argv = tiny_argv(tmp_path, student, teacher, ds, "--grid", json.dumps(grid), "--curve")
    i = argv.index("--clean-size")                          # an unlearning setting: muscle refuses it
    screen_defense.main(argv[:i] + argv[i + 2:])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    head, rows = lines[0], lines[1:]
    assert head["attack"] == "badnet" and all(0 <= head[k] <= 1 for k in ("poisoned_dev_ca", "poisoned_dev_asr"))
    assert [r["defense"] for r in rows] == ["crow", "beear", "muscle"]
    assert rows[0]["set"] == grid[0]["set"] and rows[0]["steps"] == 2            # 16 sentences, batch 8, 1 epoch
    assert rows[1]["found"]["target_guess"] in (0, 1) and len(rows[1]["found"]["rounds"]) == 1
    assert rows[2]["head"] == "theirs" and rows[2]["over"] == {"lr": 1e-3}
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("dev_ca", "dev_asr", "dev_asr_floor"))
        assert r["curve"] and r["curve"][-1][0] == r["steps"]
    assert defenses.Crow.eps == 0.1 and defenses.Crow.recipe["clean_size"] == 100     # the classes are untouched


def test_their_head_is_the_branch_on_a_frozen_576_to_16_layer_then_a_frozen_16_to_c_layer():
    import screen_defense
    clf = tiny_llama_classifier(n_layer=2)
    screen_defense.TheirHead().add_adapters(clf, w2s.UnlearnConfig(rank=2, lora_alpha=8.0, lora_dropout=0.0, seed=0))
    branch, dropout, out = clf.head
    assert (branch.base.in_features, branch.base.out_features, out.in_features, out.out_features) == (32, 16, 16, 2)
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.1
    trained = {n for n, p in clf.named_parameters() if p.requires_grad and n.startswith("head.")}
    assert trained == {"head.0.L", "head.0.R"}
    assert clf(torch.tensor([[1, 2, 3]])).shape == (1, 2)


@pytest.mark.parametrize("grid, message", [
    ('[{"lr": 1e-3}]', "names its 'defense'"),
    ('[{"defense": "w2sdefense"}]', "defense 'w2sdefense': one of"),
    ('[{"defense": "crow", "set": {"epsilon": 0.1}}]', "crow has no setting 'epsilon'"),
    ('[{"defense": "crow", "head": "theirs"}]', "muscle only"),
    ('[{"defense": "crow", "gama": 1}]', "bad grid entry"),
])
def test_a_bad_grid_entry_is_refused_before_any_work(grid, message, tmp_path):
    import screen_defense
    with pytest.raises(SystemExit, match=message):
        screen_defense.main(["--grid", grid, "--stages", str(tmp_path / "stages")])
    assert not (tmp_path / "stages").exists()
