"""The defenses (defenses.py): each one's loss and settings by hand, each one's row on the tiny world beside the
rows it is compared with, and the interface itself: a defense of another kind (trained on the poisoned set from the
pretrained student; a test-time input filter that trains nothing) joins the table with no change elsewhere."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import defenses
import lora
import losses
import train
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_args

needs_gpt2 = pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")


def test_every_defense_names_what_it_needs_and_stands_beside_registered_rows():
    for name, defense in defenses.DEFENSES.items():
        assert defense.name == name and defense.__doc__
        assert set(defense.needs) <= set(defenses.NEEDS)
        # every defense but a training-time one's ablations has some clean data
        assert "clean data" in defense.needs or name in ("muscle-lora", "muscle-mslr")
        assert all(row in defenses.DEFENSES for row in defense.beside)
        # each row stands beside its own control: the plain-LoRA one, or MuScleLoRA's ablation
        assert defenses.rows(name)[-1] == name and defenses.rows(name)[:-1][:1] in ([], ["lora"], ["muscle-lora"])
    assert defenses.rows("none") == []
    assert [name for name in defenses.DEFENSES if defenses.DEFENSES[name].uses_teacher] == \
        ["w2sdefense", "w2s-origin", "mix-w2s", "sam-w2s"]


@pytest.mark.parametrize("extra, weights", [
    (["--attack", "badnet"], (5.0, 0.001, 0.05)),
    (["--attack", "insent"], (5.0, 0.001, 0.05)),        # one set for every attack: the defender
    (["--attack", "syntactic"], (5.0, 0.001, 0.05)),     # does not know the trigger
    (["--attack", "insent", "--alpha", "10", "--gamma", "0.1"], (10.0, 0.001, 0.1)),   # the user's options win
    (["--attack", "insent", "--weights", "authors"], (3.0, 0.01, 0.001)),            # the authors' table
])
def test_preset_loss_weights_same_for_every_attack(extra, weights):
    args = w2s.parser().parse_args(["--precision", "fp32", *extra])
    a, _, u, _ = w2s.resolve_configs(args)
    assert defenses.DEFENSES["w2sdefense"].loss_weights(SimpleNamespace(attack=a, unlearn=u)) == weights


@pytest.mark.parametrize("attack", ["badnet", "insent", "syntactic"])
@pytest.mark.parametrize("which", ["ours", "authors"])
def test_control_is_w2sdefense_with_beta_and_gamma_zero(attack, which):
    # the same run but for the teacher's terms: the CE weight is W2SDefense's own (the authors': 5, 3, 1)
    ctx = SimpleNamespace(attack=w2s.AttackConfig(attack=attack), unlearn=w2s.UnlearnConfig(weights=which))
    alpha, _, _ = defenses.DEFENSES["w2sdefense"].loss_weights(ctx)
    assert defenses.DEFENSES["lora"].loss_weights(ctx) == (alpha, 0.0, 0.0)
    assert alpha == (defenses.AUTHORS_WEIGHTS[attack][0] if which == "authors" else ctx.unlearn.alpha)


@needs_gpt2
def test_lora_targets_must_be_projections_of_the_student(tmp_path):
    student, _, _ = make_tiny_world(tmp_path)            # GPT-2 style: its MLP is fc / proj, not gate / up / down
    model, _ = w2s.student_classifier(str(student), 2, 0)
    cfg = w2s.UnlearnConfig(targets=("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match=r"\['gate_proj'\] are not projections of this student"):
        defenses.add_lora(model, cfg)
    defenses.add_lora(model, w2s.UnlearnConfig(targets=("q_proj", "fc", "proj")))
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in lora.lora_modules(model)}
    assert wrapped == {"q_proj", "fc", "proj"}


def test_feature_target_of_the_origin_ablation_by_hand():
    h_s = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    h_t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert defenses.DEFENSES["w2sdefense"].feature_target(h_t) is h_t
    origin = defenses.DEFENSES["w2s-origin"].feature_target(h_t)
    assert torch.equal(origin, torch.zeros(2, 2))
    # FA toward the origin = mean ||h_s||^2 = (1 + 4 + 9 + 0) / 2 = 7; toward the teacher: ((1 + 1) + (4 + 1)) / 2
    _, terms = losses.w2s_loss(torch.zeros(2, 2), h_s, torch.tensor([0, 1]), torch.zeros(2, 2), origin, 1, 0, 1)
    assert terms["fa"] == pytest.approx(7.0)
    _, terms = losses.w2s_loss(torch.zeros(2, 2), h_s, torch.tensor([0, 1]), torch.zeros(2, 2), h_t, 1, 0, 1)
    assert terms["fa"] == pytest.approx(3.5)


def run_beside_w2sdefense(tmp_path, defense: str) -> dict:
    """The default run, then ``--defense defense`` on the same tiny world: the table gains that one row after the
    control and W2SDefense, which come from the cache untouched (same rows, no weight file rewritten)."""
    student, teacher, ds = make_tiny_world(tmp_path)
    first = w2s.run(tiny_args(tmp_path, student, teacher, ds))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("*.safetensors")}
    result = w2s.run(tiny_args(tmp_path, student, teacher, ds, "--defense", defense))
    assert [r["model"] for r in result["rows"]] == ["poisoned", "lora", "w2sdefense", defense]
    assert result["rows"][:3] == first["rows"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    return result


@needs_gpt2
def test_origin_ablation_runs_beside_w2sdefense_and_reuses_its_stages(tmp_path):
    """--defense w2s-origin: the table gains a row, the control and W2SDefense come from the cache untouched, and
    the ablation is the same run as W2SDefense but for the feature target (its first step, before any update,
    has the same CE and KL on the same batch; only FA differs)."""
    run_beside_w2sdefense(tmp_path, "w2s-origin")
    history = {name: json.loads(next((tmp_path / "stages").glob(f"{name}-*")).joinpath("history.json").read_text())[0]
               for name in ("w2sdefense", "w2s-origin")}
    assert history["w2s-origin"]["ce"] == pytest.approx(history["w2sdefense"]["ce"], rel=1e-6)
    assert history["w2s-origin"]["kd"] == pytest.approx(history["w2sdefense"]["kd"], rel=1e-6)
    assert history["w2s-origin"]["fa"] != pytest.approx(history["w2sdefense"]["fa"], rel=1e-5)


@needs_gpt2
def test_sam_defense_runs_beside_w2sdefense_and_reuses_its_stages(tmp_path):
    """--defense sam-w2s: the table gains a row beside the control and W2SDefense (both from the cache, untouched);
    its stage records rho and logs the sharpness of every step (the perturbed loss less the plain one: an ascent,
    so positive at the first step, before any update)."""
    run_beside_w2sdefense(tmp_path, "sam-w2s")
    folder = next((tmp_path / "stages").glob("sam-w2s-*"))
    history = json.loads(folder.joinpath("history.json").read_text())
    assert all("sharp" in h for h in history) and history[0]["sharp"] > 0
    assert json.loads(folder.joinpath("metrics.json").read_text())["weights"]["sam"] == defenses.SamW2S.rho


def test_mix_defense_takes_its_budget_for_the_whole_run_and_the_users_options_win():
    _, _, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32", "--defense", "mix-w2s"]))
    assert (u.clean_size, u.epochs, u.evals_per_epoch, u.gamma) == (None, 1.0, 2, 0.02)
    _, _, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32", "--defense", "mix-w2s",
                                                              "--gamma", "0.05", "--clean-size", "500"]))
    assert (u.clean_size, u.epochs, u.gamma) == (500, 1.0, 0.05)
    _, _, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32"]))
    assert (u.clean_size, u.epochs, u.gamma) == (2000, 2.0, 0.05)           # other defenses keep the preset's


@needs_gpt2
def test_mix_defense_runs_beside_the_control_and_is_w2sdefense_when_nothing_is_mixed(tmp_path, monkeypatch):
    """--defense mix-w2s: the control and the mixed W2SDefense rows; the mixing changes the student before the
    first step (its first CE differs from W2SDefense's on the same batch); with keep = 1 (nothing mixed) the
    stage is a new one and trains exactly as W2SDefense (quick preset: the same unlearning settings). The attacker
    trains both blocks here and the LoRA sits in the top one, so the frozen bottom block is the poisoned one for
    W2SDefense and a mixed one for mix-w2s: their frozen-prefix states must not be shared (a rerun in a process
    that has computed none of them trains the same)."""
    student, teacher, ds = make_tiny_world(tmp_path)
    argv = ("--attack-layers", "2")
    plain = w2s.run(tiny_args(tmp_path, student, teacher, ds, *argv))
    mixed = w2s.run(tiny_args(tmp_path, student, teacher, ds, *argv, "--defense", "mix-w2s"))
    assert [r["model"] for r in mixed["rows"]] == ["poisoned", "lora", "mix-w2s"]
    assert mixed["rows"][:2] == plain["rows"][:2] and mixed["rows"][2]["weights"]["mix"] == 0.25

    def history(name):
        return [json.loads(d.joinpath("history.json").read_text()) for d in (tmp_path / "stages").glob(f"{name}-*")]
    (h_w2s,), (h_mix,) = history("w2sdefense"), history("mix-w2s")
    assert h_mix[0]["ce"] != pytest.approx(h_w2s[0]["ce"], rel=1e-4)
    shutil.rmtree(next((tmp_path / "stages").glob("mix-w2s-*")))
    monkeypatch.setattr(train, "PREFIX_MEMO", {})
    again = w2s.run(tiny_args(tmp_path, student, teacher, ds, *argv, "--defense", "mix-w2s"))
    assert again["rows"][2]["ca"] == mixed["rows"][2]["ca"] and again["rows"][2]["asr"] == mixed["rows"][2]["asr"]
    assert history("mix-w2s") == [h_mix]
    monkeypatch.setattr(defenses.MixW2S, "keep", 1.0)
    unmixed = w2s.run(tiny_args(tmp_path, student, teacher, ds, *argv, "--defense", "mix-w2s"))
    assert len(history("mix-w2s")) == 2
    assert {k: unmixed["rows"][2][k] for k in ("ca", "asr")} == {k: plain["rows"][2][k] for k in ("ca", "asr")}
    folder = next(d for d in (tmp_path / "stages").glob("mix-w2s-*")
                  if json.loads(d.joinpath("metrics.json").read_text())["weights"]["mix"] == 1.0)
    assert json.loads(folder.joinpath("history.json").read_text()) == h_w2s


@needs_gpt2
def test_unlearning_step_reaches_the_student_only_never_the_teacher(tmp_path):
    """The teacher's outputs are constants of the loss: no graph leads back into the teacher, its saved weights
    stay byte for byte, and two backward passes in a row work (a graph into the teacher would be freed by the
    first). The student's LoRA gets a gradient from the teacher's terms alone (alpha = 0)."""
    student, teacher, ds = make_tiny_world(tmp_path)
    tcfg = w2s.TeacherConfig(teacher=str(teacher), epochs=1, max_length=16)
    acfg = w2s.AttackConfig(student=str(student), dataset=str(ds), n_poison=10)
    task = w2s.build_task(acfg, None)
    folder, _ = w2s.teacher_stage(tcfg, task, 32, tmp_path / "stages", "cpu")
    saved = (folder / "teacher.safetensors").read_bytes()
    clean = task.dataset.train
    z_t, h_t = w2s.teacher_outputs(tcfg, folder, clean.sentences, 2, 32, 16, "cpu")
    assert not z_t.requires_grad and not h_t.requires_grad and z_t.grad_fn is None and h_t.grad_fn is None
    model, tok = w2s.student_classifier(str(student), 2, 0)
    defenses.add_lora(model, w2s.UnlearnConfig(targets=("q_proj", "v_proj")))
    loss_fn = defenses.unlearning_loss(0.0, 0.01, 0.05, 2.0, z_t, h_t)
    batch = next(train.batches(train.encode(tok, clean.sentences, clean.labels, 16), 8))
    for _ in range(2):
        model.zero_grad()
        loss, terms = loss_fn(model, batch)
        loss.backward()
    assert terms["kd"] > 0 and terms["fa"] > 0
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(".B")]         # LoRA's B (A gets none at B = 0)
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert z_t.grad is None and h_t.grad is None
    assert (folder / "teacher.safetensors").read_bytes() == saved


class PoisonedSetLoRA(defenses.Control):
    """A training-time defense's shape (MuScleLoRA's): from the PRETRAINED student, LoRA on the POISONED training
    set, CE only. Here without any of MuScleLoRA's parts: it shows the interface, not the method."""
    name = "poisoned-set-lora"
    beside = ()
    needs = ("clean data", "pretrained weights", "poisoned training set")

    def start(self, ctx):
        return ctx.load_pretrained()

    def train_split(self, ctx):
        return ctx.task.poisoned_train


class DropRareWords(defenses.Defense):
    """A test-time filter's shape (ONION's): trains nothing, and rewrites every test sentence, here by dropping
    the words of two letters or fewer (which takes BadNet's ``mn`` away). Not ONION: it shows the interface."""
    name = "drop-rare-words"
    beside = ()

    def train(self, ctx):
        model, tokenizer = ctx.load_poisoned()
        return defenses.Trained(model.to(ctx.device).eval(), tokenizer, fit=None)

    def screen(self, split):
        return data.Split([" ".join(w for w in s.split() if len(w) > 2) or s for s in split.sentences],
                          list(split.labels))

    def save(self, model, folder):
        (folder / "nothing-trained.txt").write_text("a test-time filter keeps the poisoned student")


@needs_gpt2
@pytest.mark.parametrize("defense", [PoisonedSetLoRA(), DropRareWords()], ids=lambda d: d.name)
def test_a_new_kind_of_defense_joins_the_table_by_registering_one_class(defense, tmp_path, monkeypatch):
    monkeypatch.setitem(defenses.DEFENSES, defense.name, defense)
    student, teacher, ds = make_tiny_world(tmp_path)
    result = w2s.run(tiny_args(tmp_path, student, teacher, ds, "--defense", defense.name))
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["poisoned", defense.name]
    assert result["teacher_ca"] is None                         # neither needs the teacher: none was trained
    folder = next((tmp_path / "stages").glob(f"{defense.name}-*"))
    metrics = json.loads((folder / "metrics.json").read_text())
    if isinstance(defense, DropRareWords):                      # the trigger is gone from every test sentence
        assert metrics["steps"] == 0 and rows[defense.name]["asr"] <= rows["poisoned"]["asr_floor"] + 0.25
    else:                                                       # it trained, from the pretrained student
        assert metrics["steps"] > 0 and (folder / "lora.safetensors").exists()


def test_the_needs_table_in_the_docs_is_the_registrys():
    """docs/method.md shows what each defense must have; it is ``defenses.needs_table()``, so a new defense or a
    changed ``needs`` cannot leave the docs behind."""
    method = (Path(__file__).resolve().parent.parent / "docs" / "method.md").read_text()
    assert defenses.needs_table() in method
    assert all(set(d.needs) <= set(defenses.NEEDS) for d in defenses.DEFENSES.values())
