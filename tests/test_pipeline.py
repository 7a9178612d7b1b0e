"""The pipeline end to end on tiny random models, the training loop's metrics, and the command line."""

import hashlib
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attacks
import data
import defenses
import lora
import losses
import models
import stages
import train
import w2s
from conftest import needs_data  # noqa: E402
from tiny_world import make_tiny_world, tiny_args, tiny_argv  # noqa: E402

transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------- metrics on a hand-made case

def test_accuracy_asr_confusion_by_hand():
    preds = torch.tensor([0, 0, 1, 2, 0, 1])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    assert train.accuracy(preds, labels) == pytest.approx(3 / 6)
    # target 0: rows with true label != 0 are 1, 2, 3, 4; predicted 0 at rows 1 and 4 -> 2 / 4
    assert train.attack_success_rate(preds, labels, target=0) == pytest.approx(0.5)
    assert train.confusion_matrix(preds, labels, 3) == [[1, 1, 0], [1, 1, 0], [1, 0, 1]]
    with pytest.raises(ValueError):
        train.attack_success_rate(preds[:1], labels[:1], target=0)


def test_linear_schedule_warmup_then_decay():
    assert [round(train.linear_schedule(s, 10, 2), 3) for s in range(0, 11, 2)] == [0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert not train.native_bf16("cpu", cpuinfo=str(info))               # AVX2 only: bf16 would be emulated
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert train.native_bf16("cpu", cpuinfo=str(info))
    assert not train.native_bf16("cpu", cpuinfo=str(tmp_path / "missing"))


def test_machine_names_the_cpu_by_family_and_model():
    two_processors = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                      "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                      "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: another\nflags\t\t: amx_bf16\n")
    assert stages.cpu_identity(two_processors) == {"cpu": "AMD EPYC 9R14 96-Core Processor", "cpu_family": "25",
                                                "cpu_model": "17"}
    assert stages.cpu_identity("") == {"cpu": None, "cpu_family": None, "cpu_model": None}
    assert {"cpu", "cpus", "torch", "python"} <= set(stages.machine())


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("bf16", True),
                                                 ("auto", train.native_bf16("cpu"))])
def test_precision_option_sets_every_stage(precision, expected):
    args = w2s.parser().parse_args(["--precision", precision, "--device", "cpu"])
    assert [c.bf16 for c in w2s.resolve_configs(args)[:3]] == [expected] * 3


@pytest.mark.parametrize("extra, mode", [
    (["--attack", "badnet"], "clean"),
    (["--attack", "syntactic"], "dirty-any"),                        # the cpu preset's per-attack setting
    (["--attack", "syntactic", "--poison-mode", "clean"], "clean"),  # ... which the user's option overrides
    (["--attack", "syntactic", "--preset", "paper"], "clean"),       # the paper's attacker is clean-label
])
def test_preset_poisoning_mode_per_attack(extra, mode):
    a, _, _, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32", *extra]))
    assert a.mode == mode


@needs_data
@pytest.mark.parametrize("preset", sorted(w2s.PRESETS))
@pytest.mark.parametrize("attack", ["badnet", "insent", "syntactic"])
@pytest.mark.parametrize("target", [0, 1])
def test_every_preset_can_poison_sst2_with_every_attack(preset, attack, target):
    # the poisoned training set of every preset, attack and target can be built (no model is loaded); the quick
    # preset's syntactic attack once asked for 20 % of the non-target rows, more than SST-2's SCPN files paraphrase
    args = w2s.parser().parse_args(["--preset", preset, "--attack", attack, "--target", str(target),
                                    "--precision", "fp32"])
    a, _, _, eval_size = w2s.resolve_configs(args)
    task = w2s.build_task(a, eval_size)
    assert 0 < task.n_poisoned < len(task.poisoned_train) and len(task.asr_test) > 0
    # the floor set is the ASR set's rows without their trigger, also after the quick preset's seeded subset
    assert task.asr_floor.labels == task.asr_test.labels
    if attack == "badnet":
        assert all(sorted(t.split()) == sorted(f.split() + ["mn"])
                   for t, f in zip(task.asr_test.sentences, task.asr_floor.sentences))
    else:
        assert all(t != f for t, f in zip(task.asr_test.sentences, task.asr_floor.sentences))
        assert set(task.asr_floor.sentences) <= set(task.dataset.test.sentences)
    # where the whole test set is read (cpu, paper), the floor is the CA pass's answers on the floor's own rows
    assert (task.floor_in_test is not None) == (eval_size is None or eval_size >= len(task.dataset.test))
    if task.floor_in_test is not None:
        assert [task.test.sentences[k] for k in task.floor_in_test] == task.asr_floor.sentences
        assert [task.test.labels[k] for k in task.floor_in_test] == task.asr_floor.labels


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


@pytest.mark.parametrize("extra, name", [
    ([], "badnet-sst2-cpu-seed0"),
    (["--seed", "2", "--attack", "insent"], "insent-sst2-cpu-seed2"),
    (["--n-poison", "0", "--defense", "none"], "badnet-sst2-cpu-seed0-clean-defense-none"),
    (["--poison-mode", "dirty", "--poison-rate", "0", "--defense", "none"],
     "badnet-sst2-cpu-seed0-dirty-label-clean-defense-none"),
    (["--attack", "syntactic"], "syntactic-sst2-cpu-seed0"),                    # dirty-any is its preset's mode
    (["--attack", "syntactic", "--poison-mode", "dirty"], "syntactic-sst2-cpu-seed0-dirty-label"),
    (["--attack", "syntactic", "--poison-mode", "clean"], "syntactic-sst2-cpu-seed0-clean-label"),
    (["--defense", "lora"], "badnet-sst2-cpu-seed0-defense-lora"),
    (["--seed", "1", "--unlearn-seed", "100", "--defense", "mix-w2s"],
     "badnet-sst2-cpu-seed1-unlearn-seed100-defense-mix-w2s"),
    (["--seed", "1", "--unlearn-seed", "1"], "badnet-sst2-cpu-seed1"),         # the default, said out loud
    (["--defense", "w2s-origin"], "badnet-sst2-cpu-seed0-defense-w2s-origin"),
    (["--weights", "authors", "--preset", "quick"], "badnet-sst2-quick-seed0-weights-authors"),
    (["--lora-targets", "q_proj v_proj gate_proj up_proj down_proj"], "badnet-sst2-cpu-seed0-lora-q-v-gate-up-down"),
    # every other setting that differs from the preset's, in the order of the configs' fields
    (["--rank", "64", "--gamma", "0.1"], "badnet-sst2-cpu-seed0-gamma0.1-rank64"),
    (["--gamma", "0.05"], "badnet-sst2-cpu-seed0"),                             # the preset's own value
    (["--defense", "mix-w2s", "--gamma", "0.05"], "badnet-sst2-cpu-seed0-defense-mix-w2s-gamma0.05"),   # not mix's
    (["--student", "gpt2", "--teacher", "bert-base-uncased"],
     "badnet-sst2-cpu-seed0-student-gpt2-teacher-bert-base-uncased"),
    (["--triggers", "cf", "--attack-epochs", "2", "--teacher-epochs", "1", "--epochs", "3"],
     "badnet-sst2-cpu-seed0-triggers-cf-attack-epochs2.0-teacher-epochs1.0-epochs3.0"),
    (["--attack", "insent", "--insent-sentence", "we loved that old song"], "insent-sst2-cpu-seed0-insent-sentence-"
     + hashlib.sha256(b"we loved that old song").hexdigest()[:8]),
    (["--n-poison", "500", "--clean-size", "100"], "badnet-sst2-cpu-seed0-n-poison500-clean-size100"),
])
def test_default_run_folder_names_what_differs(extra, name):
    """A clean fine-tune, a single defense or any other setting must not overwrite the full run's results.json."""
    args = w2s.parser().parse_args(["--attack", "badnet", *extra])
    a, t, u, _ = w2s.resolve_configs(args)
    assert w2s.run_name(args, a, t, u) == name


def test_default_run_folder_names_a_precision_other_than_the_machines():
    native = train.native_bf16("cpu")
    for precision, suffix in (("auto", ""), ("bf16", "" if native else "-bf16"), ("fp32", "-fp32" if native else "")):
        args = w2s.parser().parse_args(["--precision", precision, "--device", "cpu"])
        assert w2s.run_name(args, *w2s.resolve_configs(args)[:3]) == "badnet-sst2-cpu-seed0" + suffix


def test_unlearn_seed_sets_the_unlearning_stages_seed_only():
    """--unlearn-seed moves the defender's draws (clean subset, batch order, dropout, LoRA init) and leaves the
    attacker's and the teacher's on --seed, so that a second unlearning seed reuses the cached student and teacher."""
    args = w2s.parser().parse_args(["--precision", "fp32", "--seed", "2", "--unlearn-seed", "7"])
    a, t, u, _ = w2s.resolve_configs(args)
    assert (a.seed, t.seed, u.seed) == (2, 2, 7)
    a, t, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--precision", "fp32", "--seed", "2"]))
    assert (a.seed, t.seed, u.seed) == (2, 2, 2)


def test_length_bucketed_batches_cover_every_row_once():
    enc = train.Encoded([[1] * n for n in range(1, 40)], torch.arange(39) % 2, pad_id=0)
    seen = []
    for b in train.batches(enc, 8, shuffle=True, rng=random.Random(0), bucket=2):
        seen += b.index.tolist()
        lengths = b.attention_mask.sum(1)
        assert b.input_ids.shape[1] == lengths.max()                # dynamic padding
    assert sorted(seen) == list(range(39))


# ---------------------------------------------------------------- tiny end-to-end run

@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_lora_targets_must_be_projections_of_the_student(tmp_path):
    student, _, _ = make_tiny_world(tmp_path)            # GPT-2 style: its MLP is fc / proj, not gate / up / down
    model, _ = w2s.student_classifier(str(student), 2, 0)
    cfg = w2s.UnlearnConfig(targets=("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match=r"\['gate_proj'\] are not projections of this student"):
        defenses.add_lora(model, cfg)
    defenses.add_lora(model, w2s.UnlearnConfig(targets=("q_proj", "fc", "proj")))
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in lora.lora_modules(model)}
    assert wrapped == {"q_proj", "fc", "proj"}


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_lora_targets_the_student_lacks_fail_before_the_attack_trains(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    assert models.decoder_style(student) == "gpt2"
    assert models.decoder_style(tmp_path / "nowhere") is None        # no metadata: the loader gives the error
    with pytest.raises(SystemExit) as e:
        w2s.run(tiny_args(tmp_path, student, teacher, ds, "--lora-targets", "q_proj gate_proj"))
    assert "--lora-targets gate_proj: not projections of" in str(e.value) and "fc, proj" in str(e.value)
    assert not (tmp_path / "stages").exists()                        # nothing trained, nothing cached


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_tiny_end_to_end_learns_trigger_writes_results_and_reuses_stages(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    result = w2s.run(tiny_args(tmp_path, student, teacher, ds))
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"poisoned", "lora", "w2sdefense"}
    for r in rows.values():
        assert 0.0 <= r["ca"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["asr_floor"] <= 1.0
        assert (r["n_test"], r["n_asr"]) == (32, 16)      # what each fraction counts: 32 test rows, 16 positives
    assert rows["poisoned"]["asr"] >= 0.9          # the tiny model learns the trigger "mn" -> label 0
    assert rows["poisoned"]["asr_floor"] < rows["poisoned"]["asr"]    # ... the trigger, not a bias toward label 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("rows", "teacher_ca", "seconds", "wall_seconds", "config", "seed", "machine", "device", "preset",
                "defense"):
        assert key in saved
    report = (tmp_path / "run" / "results.md").read_text()
    assert report.startswith("# badnet") and "| model | CA | ASR | floor | seconds |" in report
    header = report.splitlines()[0]               # what differs from the quick preset, as the run folder names it
    assert "; changed: student-" in header and "attack-epochs8.0" in header and "clean-size32" in header
    assert stages.FLOOR_LEGEND in report
    stage_dirs = sorted(p.name for p in (tmp_path / "stages").iterdir())
    assert [d.split("-")[0] for d in stage_dirs] == ["attack", "lora", "teacher", "w2sdefense"]
    for d in stage_dirs:                            # every trained stage keeps its clean-dev curve
        if not d.startswith("teacher"):
            metrics = json.loads((tmp_path / "stages" / d / "metrics.json").read_text())
            assert metrics["dev_history"][-1][0] == metrics["steps"]
            # the floor is the CA pass's own answers: the positives (16 of 32) it called label 0
            assert metrics["n_asr"] == 16 and metrics["asr_floor"] * 16 == metrics["confusion"][1][0]
    # --attack-layers 1: the attacker trained only the top block; the bottom one is still the pretrained one
    import weights
    poisoned = weights.read_safetensors(next((tmp_path / "stages").glob("attack-*")) / "student.safetensors")
    pretrained = weights.read_safetensors(student / "model.safetensors")
    assert torch.equal(poisoned["backbone.blocks.0.attn.q_proj.weight"], pretrained["transformer.h.0.attn.c_attn.weight"][:, :32].T)
    assert not torch.equal(poisoned["backbone.blocks.1.attn.q_proj.weight"], pretrained["transformer.h.1.attn.c_attn.weight"][:, :32].T)
    lora_names = weights.read_safetensors(next((tmp_path / "stages").glob("w2sdefense-*")) / "lora.safetensors")
    assert lora_names and all(".blocks.0." not in n for n in lora_names)     # --lora-layers 1: the top block only
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("*.safetensors")}
    again = w2s.run(tiny_args(tmp_path, student, teacher, ds))     # every stage is reused, nothing rewritten
    assert again["rows"] == result["rows"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("*.safetensors")}


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_calibration_script_runs_a_grid_on_tiny_models_one_json_line_per_entry(tmp_path, capsys, monkeypatch):
    """bench/calibrate_w2s.py, which every choice of the defaults went through: the header line, then one line per
    grid entry with the dev measures (fractions); trained entries add the kept checkpoint's dev accuracy and the
    loss terms' last-25 means; the levers that change the model before training (here the mix) run too."""
    import calibrate_w2s
    student, teacher, ds = make_tiny_world(tmp_path)
    # the tiny dev set is all taken by the dev readings; the threshold line fits on all of it here (which rows it
    # may use on SST-2 is threshold_rows' test, in test_losses)
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


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_a_second_unlearning_seed_reuses_the_attack_and_teacher_and_trains_both_unlearning_stages_again(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    first = w2s.run(tiny_args(tmp_path, student, teacher, ds))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "stages").rglob("*.safetensors")}
    again = w2s.run(tiny_args(tmp_path, student, teacher, ds, "--unlearn-seed", "5"))
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}         # nothing cached was retrained
    assert again["rows"][0] == first["rows"][0] and again["teacher_ca"] == first["teacher_ca"]
    assert (again["seed"], again["unlearn_seed"], first["unlearn_seed"]) == (0, 5, 0)
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "stages").iterdir())
    assert folders == ["attack", "lora", "lora", "teacher", "w2sdefense", "w2sdefense"]


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
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


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
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


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
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
    import shutil
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


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_student_reads_a_start_token_and_a_prefix_space(tmp_path):
    """The classifier reads "<start> sentence" with the model's BOS (GPT-2 has none: <|endoftext|>), and a
    space before the first word, so a word is the same tokens first or anywhere else."""
    student, _, _ = make_tiny_world(tmp_path)
    _, tok = w2s.student_classifier(str(student), 2, seed=0)
    _, bare = w2s.student_classifier(str(student), 2, seed=0, start_token=False, prefix_space=False)
    assert tok.encode("mn is a word") == [50256] + bare.encode(" mn is a word")
    assert bare.encode("mn is a word") != bare.encode(" mn is a word")                # the BPE quirk it fixes
    assert tok.encode("mn")[1:] == tok.encode("is mn")[-len(tok.encode("mn")) + 1:]
    enc = train.encode(tok, ["mn", "a b c"], [0, 1], max_length=2)         # truncation keeps the start token
    assert [row[0] for row in enc.ids] == [50256, 50256] and [len(r) for r in enc.ids] == [2, 2]


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_unpoisoned_fine_tune_is_reported_as_clean(tmp_path):
    """--n-poison 0: the same fine-tune on clean data; its 'ASR' is the natural false-trigger rate."""
    student, teacher, ds = make_tiny_world(tmp_path)
    result = w2s.run(tiny_args(tmp_path, student, teacher, ds, "--poison-mode", "clean", "--n-poison", "0",
                               "--defense", "none"))
    [row] = result["rows"]
    assert row["model"] == "clean" and row["n_poisoned"] == 0 and 0.0 <= row["asr"] <= 1.0


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_cached_teacher_outputs_equal_a_fresh_forward(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    tcfg = w2s.TeacherConfig(teacher=str(teacher), epochs=1, max_length=16)
    acfg = w2s.AttackConfig(student=str(student), dataset=str(ds), n_poison=10)
    task = w2s.build_task(acfg, None)
    folder, _ = w2s.teacher_stage(tcfg, task, 32, tmp_path / "stages", "cpu")
    sentences = task.dataset.train.sentences[:10]
    z1, h1 = w2s.teacher_outputs(tcfg, folder, sentences, 2, 32, 16, "cpu")     # computed and cached
    z2, h2 = w2s.teacher_outputs(tcfg, folder, sentences, 2, 32, 16, "cpu")     # read from the cache
    model, tok = w2s.teacher_classifier(tcfg, 2, 32)
    stages.load_model_state(model, folder / "teacher.safetensors")
    ids, mask = tok.encode_batch(sentences, max_length=16)
    with torch.no_grad():
        z, h = model.eval()(ids, mask, return_features=True)
    torch.testing.assert_close(z1, z, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, h, atol=1e-5, rtol=0)
    assert torch.equal(z1, z2) and torch.equal(h1, h2)


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
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


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_a_dataset_folder_is_named_by_its_contents_in_the_stage_keys(tmp_path):
    """Two folders of the same name, or one folder edited, never share a cached stage; a shipped name adds nothing."""
    _, _, ds = make_tiny_world(tmp_path)
    other = tmp_path / "elsewhere" / "ds"
    other.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (other / f"{split}.tsv").write_text((ds / f"{split}.tsv").read_text())
    key = lambda folder: w2s.build_task(w2s.AttackConfig(dataset=str(folder), n_poison=10), None).data_key
    assert key(ds) == key(other) and set(key(ds)) == {"data"}
    lines = (other / "train.tsv").read_text().splitlines()
    sentence, label = lines[1].split("\t")
    (other / "train.tsv").write_text("\n".join([lines[0], f"{sentence}\t{1 - int(label)}", *lines[2:]]) + "\n")
    assert key(ds) != key(other)
    assert stages.dataset_key("sst2", None) == {}


def test_a_stage_file_of_another_model_is_refused_by_name(tmp_path):
    import weights
    weights.write_safetensors(tmp_path / "w.safetensors", {"weight": torch.zeros(4, 2), "bias": torch.zeros(4)})
    with pytest.raises(weights.WeightFileError, match=r"weight \(4, 2\) \(expected \(3, 2\)\)"):
        stages.load_model_state(torch.nn.Linear(2, 3), tmp_path / "w.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_stage_file_says_to_remake_the_stage_not_to_download_it(damage, tmp_path):
    import weights
    stages.save_model(torch.nn.Linear(2, 3), tmp_path / "stage" / "w.safetensors")
    path = tmp_path / "stage" / "w.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:
        path.unlink()
    with pytest.raises(weights.WeightFileError) as e:
        stages.load_model_state(torch.nn.Linear(2, 3), path)
    assert str(e.value).startswith(f"{path}: ") and "download" not in str(e.value)
    assert str(e.value).endswith(f"it is a stage's file: delete the folder {path.parent} and rerun to make it again")


def test_a_clean_set_larger_than_the_training_set_is_an_error_before_any_training(tmp_path):
    (tmp_path / "ds").mkdir()
    for split in ("train", "dev", "test"):
        (tmp_path / "ds" / f"{split}.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    with pytest.raises(SystemExit, match="--clean-size 4 is more than the 3 clean training sentences"):
        w2s.run(w2s.parser().parse_args(["--dataset", str(tmp_path / "ds"), "--clean-size", "4", "--stages",
                                         str(tmp_path / "s"), "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "s").exists()


def test_a_missing_split_file_is_an_error_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    code = w2s.main(["--dataset", str(tmp_path / "ds"), "--stages", str(tmp_path / "s"),
                     "--out", str(tmp_path / "o")])
    assert code == 2 and "dev.tsv is missing" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- command line: errors before any work

@pytest.mark.parametrize("argv, message", [
    (["--attack", "nope"], "choose one of badnet, insent, syntactic"),
    (["--defense", "nope"], "choose one of none, lora, w2sdefense"),
    (["--dataset", "nope"], "choose one of sst2"),
    (["--attack", "syntactic", "--dataset", "agnews"], "paraphrases"),
    (["--rank", "0"], "--rank must be positive"),
    (["--gamma", "-1"], "--gamma must be >= 0"),
    (["--lora-layers", "0"], "--lora-layers must be at least 1"),
    (["--lora-targets", "q_proj nope"], "choose among q_proj, k_proj"),
    (["--attack-layers", "-2"], "--attack-layers must be at least 1"),
    (["--defense", "w2s-origin", "--fa", "normalized"], "needs the L2 feature distance"),
    (["--weights", "authors", "--gamma", "0.1"], "drop --gamma"),
    (["--poison-rate", "0.2"], "clean-label poisoning takes --n-poison"),           # the cpu preset is clean-label
    (["--poison-mode", "dirty", "--n-poison", "10"], "dirty takes --poison-rate"),
    (["--poison-mode", "dirty", "--poison-rate", "2"], "in [0, 1]"),
    (["--target", "7"], "--target 7 is not a class of sst2 (0..1)"),
    (["--lr", "0"], "--lr must be positive"),
    (["--attack-lr=-1e-4"], "--attack-lr must be positive"),
    (["--insertions", "0"], "--insertions must be positive"),
    (["--clean-size", "0"], "--clean-size must be at least 1"),
    (["--student", "nope"], "unknown student 'nope'; valid names are smollm2-135m, gpt2"),
    (["--teacher", "nope"], "unknown teacher 'nope'; valid names are minilm-l6, bert-base-uncased"),   # not after the attack
    (["--triggers", ""], "--triggers needs at least one word"),
    (["--attack", "insent", "--insent-sentence", " "], "--insent-sentence is empty"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--unlearn-seed", "-5"], "--unlearn-seed must be >= 0"),
    (["--device", "nope"], "--device 'nope' is not a torch device"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),      # no machine here has 100 GPUs
])
def test_cli_rejects_bad_input_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        w2s.run(w2s.parser().parse_args(argv + ["--stages", str(tmp_path / "s"), "--out", str(tmp_path / "o")]))
    assert message in str(e.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


def test_the_control_alone_does_not_need_the_teacher():
    a, t, u, _ = w2s.resolve_configs(w2s.parser().parse_args(["--defense", "lora", "--teacher", "nope"]))
    w2s.check_configs(a, t, u, "lora", None)                    # nothing to resolve: the control has no teacher
    with pytest.raises(SystemExit, match="unknown teacher 'nope'"):
        w2s.check_configs(a, t, u, "w2sdefense", None)


@pytest.mark.parametrize("preset, noted", [("paper", True), ("quick", False)])
def test_the_paper_preset_on_a_cpu_says_it_is_sized_for_a_gpu(preset, noted, monkeypatch, capsys, tmp_path):
    def stop(*args, **kwargs):
        raise RuntimeError("stop before any work")
    monkeypatch.setattr(w2s, "build_task", stop)
    with pytest.raises(RuntimeError, match="stop before any work"):
        w2s.run(w2s.parser().parse_args(["--preset", preset, "--device", "cpu", "--stages", str(tmp_path / "s"),
                                         "--out", str(tmp_path / "o")]))
    assert ("sized for a GPU" in capsys.readouterr().err) == noted


@pytest.mark.parametrize("flag", ["--stages", "--out"])
def test_a_file_where_a_folder_goes_is_an_error_before_any_work(flag, tmp_path):
    (tmp_path / "f").write_text("keep me")
    folders = {"--stages": str(tmp_path / "s"), "--out": str(tmp_path / "o"), flag: str(tmp_path / "f")}
    with pytest.raises(SystemExit, match=f"{flag} .*f is a file"):
        w2s.run(w2s.parser().parse_args([arg for pair in folders.items() for arg in pair]))
    assert (tmp_path / "f").read_text() == "keep me"
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("script, extra, message", [
    # the trigger is measured on non-target dev sentences; SST-2's SCPN dev file paraphrases only negative ones,
    # so the reported direction (target 0) has none
    ("calibrate_w2s", ["--grid", "[{}]"], "the syntactic attack has no triggered non-target dev sentences here: "
                                          "sst2: the SCPN dev file paraphrases only label-0 dev rows"),
    # the diagnostics measure an inserted trigger
    ("feature_gap", [], "measures an inserted trigger"), ("latent_shift", [], "measures an inserted trigger")])
def test_dev_side_bench_scripts_refuse_the_syntactic_attack_before_any_work(script, extra, message, tmp_path):
    import importlib
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit, match=f"{script}.py: {message}"):
        main(["--attack", "syntactic", "--stages", str(tmp_path / "s"), *extra])
    with pytest.raises(SystemExit, match="--rank must be positive"):          # w2s.py's checks first, the same
        main(["--rank", "0", "--stages", str(tmp_path / "s"), *extra])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("script, extra, message", [
    ("block_reset", ["--groups", "0-9", "0-99"], "block group '0-99' is outside the blocks 0-29"),
    ("latent_shift", ["--blocks", "4", "30"], r"blocks must be in 0..29, got \[4, 30\]"),
    ("sam_scale", ["--rho", "2", "-1"], "--rho is a perturbation's radius, at least 0"),
])
def test_bench_scripts_check_block_indices_and_radii_before_any_work(script, extra, message, tmp_path):
    """The default student's 30 blocks, read from its metadata (``models.decoder_depth``) before the attack trains."""
    import importlib
    with pytest.raises(SystemExit, match=f"{script}.py: {message}"):
        importlib.import_module(script).main(["--stages", str(tmp_path / "s"), *extra])
    assert not (tmp_path / "s").exists()


def test_dev_pairs_inserted_trigger_draws_as_asr_set_does():
    # bench/calibrate_w2s.py's dev ASR set: for an inserted word, the same sentences, draw for draw, as
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


def test_table_prints_a_floor_and_a_dash_for_a_stage_cached_without_one():
    # a stage cached before the floor was measured has none in its metrics.json: its row says so, it does not fail
    rows = [{"model": "poisoned", **stages.row_metrics({"ca": 0.9, "asr": 0.95, "seconds": 12.0})},
            {"model": "w2sdefense", **stages.row_metrics({"ca": 0.875, "asr": 0.125, "asr_floor": 0.0625,
                                                        "seconds": 3.4})}]
    assert rows[0]["asr_floor"] is None
    assert stages.markdown_table(rows).splitlines()[2:] == ["| poisoned | 0.900 | 0.950 | - | 12 |",
                                                          "| w2sdefense | 0.875 | 0.125 | 0.062 | 3 |"]


def test_cli_rejects_unknown_preset():
    with pytest.raises(SystemExit):
        w2s.parser().parse_args(["--preset", "huge"])


def test_collect_results_mean_and_sample_std_by_hand():
    # bench/collect_results.py prints RESULTS.md's tables. ASR 0.1 and 0.3: mean 0.2, sample std
    # sqrt((0.1^2 + 0.1^2) / (2 - 1)) = 0.1414; CA 0.9 both: std 0.
    import collect_results
    runs = [{"seed": s, "rows": [{"model": "w2sdefense", "ca": 0.9, "asr": asr}], "teacher_ca": 0.88,
             "wall_seconds": 60.0} for s, asr in ((0, 0.1), (1, 0.3))]
    lines = collect_results.table(runs).splitlines()
    assert lines[2] == "| 0 | 0.900 / 0.100 | 0.880 | 60 |"
    assert lines[-1] == "| mean ± std | 0.900 ± 0.000 / 0.200 ± 0.141 | 0.880 ± 0.000 |  |"
    # with the ASR's floor in every run (floors 0.05 and 0.15: mean 0.1, std 0.0707), it gets its own column
    for run, floor in zip(runs, (0.05, 0.15)):
        run["rows"][0]["asr_floor"] = floor
    lines = collect_results.table(runs).splitlines()
    assert lines[0] == "| seed | w2sdefense CA / ASR / floor | teacher CA | wall s |"
    assert lines[2] == "| 0 | 0.900 / 0.100 / 0.050 | 0.880 | 60 |"
    assert lines[-1] == "| mean ± std | 0.900 ± 0.000 / 0.200 ± 0.141 / 0.100 ± 0.071 | 0.880 ± 0.000 |  |"
    runs[1]["rows"][0]["asr_floor"] = None              # a run cached before the floor: no floor column
    assert collect_results.table(runs).splitlines()[0] == "| seed | w2sdefense CA / ASR | teacher CA | wall s |"
    # CA change from the poisoned student, in points: (0.90 - 0.92) and (0.90 - 0.89) -> -2.0 and +1.0, mean -0.5
    assert collect_results.ca_change(runs) == ""                      # no poisoned row, nothing to compare
    for run, ca in zip(runs, (0.92, 0.89)):
        run["rows"].insert(0, {"model": "poisoned", "ca": ca, "asr": 1.0})
    assert collect_results.ca_change(runs) == "CA change from the poisoned student, mean in points: w2sdefense -0.5"


def test_collect_results_per_student_over_unlearning_seeds_by_hand():
    # Student 0 (attack seed 0): mix-w2s ASR 0.10, 0.14; CA 0.91, 0.89 against a poisoned 0.90 -> +1, -1 points.
    # Student 1: ASR 0.08, 0.12, 0.10; CA 0.90, 0.90, 0.93 -> 0, 0, +3 points.
    # Per-student mean ASR 0.12 and 0.10: mean 0.11, sample sd 0.02 / sqrt(2), standard error that / sqrt(2) = 0.010.
    # CA change means 0 and +1: +0.5, standard error (1 / sqrt(2)) / sqrt(2) = 0.5.
    # Within-student variances 0.0008 and 0.0004: pooled sd sqrt(0.0006) = 0.0245.
    import collect_results

    def run(seed, unlearn, asr, ca):
        return {"seed": seed, "unlearn_seed": unlearn, "config": {"attack": {"attack": "badnet", "seed": seed}},
                "rows": [{"model": "poisoned", "ca": 0.90, "asr": 1.0}, {"model": "mix-w2s", "ca": ca, "asr": asr}],
                "teacher_ca": 0.88, "wall_seconds": 60.0}
    runs = [run(0, 0, 0.10, 0.91), run(0, 100, 0.14, 0.89),
            run(1, 1, 0.08, 0.90), run(1, 100, 0.12, 0.90), run(1, 101, 0.10, 0.93)]
    assert [collect_results.seed_cell(r) for r in runs] == ["0", "0 u100", "1", "1 u100", "1 u101"]
    lines = collect_results.per_student(runs).splitlines()
    assert lines[0].startswith("Per poisoned student (2; runs per student: 2, 3)")
    assert lines[1] == ("- mix-w2s: ASR 0.110 ± 0.010, CA change +0.5 ± 0.5 points; within-student sd of ASR "
                        "0.0245 (2 students with two runs or more)")
    assert lines[2] == "Each student's mean ASR over its unlearning seeds: mix-w2s 0.120, 0.100"
    assert collect_results.per_student([runs[0], runs[2]]) == ""          # one run per student: nothing to pool
    del runs[1]["rows"][0]
    with pytest.raises(SystemExit, match="poisoned and a mix-w2s row"):
        collect_results.per_student(runs)


def test_screen_gate_means_by_hand(tmp_path):
    # bench/screen_gate.py reads a screen's gate. Planted students: dev ASR 0.08 and 0.14 -> mean 0.11 (over 0.10);
    # whole dev 0.90 -> 0.88 and 0.92 -> 0.92: mean 0.91 -> 0.90, a drop of 1.0 point. The third student (poisoned
    # dev ASR 0.5) was not planted and is left out, though its line would pass.
    import screen_gate
    files = []
    for i, (p_asr, p_acc, asr, acc) in enumerate(((0.98, 0.90, 0.08, 0.88), (0.95, 0.92, 0.14, 0.92),
                                                  (0.5, 0.90, 0.0, 0.95))):
        f = tmp_path / f"s{i}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in (
            {"seed": i, "poisoned_dev_acc": p_acc},
            {"defense": "none", "over": {}, "dev_ca": 0.9, "dev_asr": p_asr},
            {"defense": "w2sdefense", "over": {"mix": 0.25}, "dev_ca": 0.9, "dev_asr": asr, "dev_acc": acc})) + "\n")
        files.append(f)
    rows = [screen_gate.student([f]) for f in files]
    assert rows[0]["change"] == pytest.approx(-2.0)
    g = screen_gate.gate(rows, max_asr=0.10, max_drop=1.5, planted=0.80)
    assert (g["students"], g["left_out"]) == (2, 1)
    assert g["mean_asr"] == pytest.approx(0.11) and g["mean_drop"] == pytest.approx(1.0)
    assert g["mean_acc"] == pytest.approx(0.90) and g["mean_floor"] is None       # these lines carry no floor
    assert not g["passes"]
    # --defense none reads the poisoned line itself, with the header's whole dev: ASR (0.98 + 0.95) / 2 = 0.965.
    own = [screen_gate.student([f], defense="none") for f in files]
    assert own[0]["dev_asr"] == 0.98 and own[0]["dev_acc"] == 0.90 and own[0]["change"] == 0.0
    assert screen_gate.gate(own, max_asr=1.0, max_drop=1.5, planted=0.80)["mean_asr"] == pytest.approx(0.965)
    assert screen_gate.gate(rows, max_asr=0.12, max_drop=1.5, planted=0.80)["passes"]
    assert not screen_gate.gate(rows, max_asr=0.12, max_drop=0.9, planted=0.80)["passes"]
    with pytest.raises(SystemExit, match="lacks"):
        screen_gate.student([files[0]], over={"mix": 0.5})
    # At the limit passes: 0.900 -> 0.885 is a drop of exactly 1.5 points, which floats make 1.5000000000000013.
    at_limit = [dict(rows[0], poisoned_acc=0.900, dev_acc=0.885, dev_asr=0.10)]
    assert screen_gate.gate(at_limit, max_asr=0.10, max_drop=1.5, planted=0.80)["passes"]
    # A context line in a file of its own (no poisoned line there): the student's files read together, the line
    # picked by its defense. Seed 0's CE-only line: whole dev 0.90 -> 0.87, a change of -3.0 points.
    context = tmp_path / "s0_context.jsonl"
    context.write_text("\n".join(json.dumps(r) for r in (
        {"seed": 0, "poisoned_dev_acc": 0.90},
        {"defense": "lora", "over": {"mix": 0.25}, "dev_ca": 0.9, "dev_asr": 0.2, "dev_acc": 0.87})) + "\n")
    with pytest.raises(SystemExit, match="lacks"):
        screen_gate.student([context])
    row = screen_gate.student([files[0], context], over={"mix": 0.25}, defense="lora")
    assert row["dev_asr"] == 0.2 and row["change"] == pytest.approx(-3.0) and row["poisoned_asr"] == 0.98
    with pytest.raises(SystemExit, match="different students"):
        screen_gate.student([files[1], context])
    # Against the floor: dev ASR 0.133 and 0.120 over floors 0.127 and 0.100 are 0.006 and 0.020 above them, a mean
    # of 0.013: passes 0.03 and fails 0.01, whatever --max-asr says of the absolute 0.1265 (gated here at 1.0).
    floored = [dict(rows[0], dev_asr=0.133, floor=0.127), dict(rows[1], dev_asr=0.120, floor=0.100)]
    g = screen_gate.gate(floored, max_asr=1.0, max_drop=1.5, planted=0.80, max_over_floor=0.03)
    assert g["mean_over_floor"] == pytest.approx(0.013) and g["passes"]
    assert g["mean_floor"] == pytest.approx(0.1135)                                # (0.127 + 0.100) / 2
    assert not screen_gate.gate(floored, max_asr=1.0, max_drop=1.5, planted=0.80, max_over_floor=0.01)["passes"]
    assert not screen_gate.gate(floored, max_asr=0.12, max_drop=1.5, planted=0.80, max_over_floor=0.03)["passes"]
    assert screen_gate.gate(floored, max_asr=1.0, max_drop=1.5, planted=0.80)["mean_over_floor"] == pytest.approx(0.013)
    assert screen_gate.gate(rows, max_asr=1.0, max_drop=1.5, planted=0.80)["mean_over_floor"] is None   # no floors
    with pytest.raises(SystemExit, match="dev_asr_floor"):
        screen_gate.gate(rows, max_asr=1.0, max_drop=1.5, planted=0.80, max_over_floor=0.03)
    files[1].write_text(files[1].read_text() + "{not json\n")
    with pytest.raises(SystemExit, match="s1.jsonl, line 4"):
        screen_gate.student([files[1]])


def test_seed_spread_by_hand(tmp_path):
    # bench/seed_spread.py: variances 0.005 ([0.1, 0.2]) and 0.03 ([0.3, 0.3, 0.6]) pool to sqrt(0.0175) = 0.1323.
    import seed_spread
    assert seed_spread.pooled_sd([[0.1, 0.2], [0.3, 0.3, 0.6]]) == pytest.approx(math.sqrt(0.0175))
    with pytest.raises(SystemExit, match="at least two"):
        seed_spread.pooled_sd([[0.1, 0.2], [0.3]])
    # A student's readings: the line under any unlearning seed (its own has no "seed"), not another line or the poisoned.
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (
        {"seed": 6, "poisoned_dev_acc": 0.9},
        {"defense": "none", "over": {}, "dev_asr": 1.0},
        {"defense": "w2sdefense", "over": {"mix": 0.25}, "dev_asr": 0.10},
        {"defense": "w2sdefense", "over": {"mix": 0.25, "seed": 100}, "dev_asr": 0.12},
        {"defense": "w2sdefense", "over": {"mix": 0.5, "seed": 100}, "dev_asr": 0.30})) + "\n")
    assert [r["dev_asr"] for r in seed_spread.readings([f], {"mix": 0.25})] == [0.10, 0.12]


def test_floor_split_by_hand():
    # bench/floor_split.py: of 20 sentences, a defended model calls 5 with the trigger and 2 without it the target;
    # a clean model 4 and 1. Gap 5 - 4 = 1 = raised floor (2 - 1 = 1) + beyond ((5 - 2) - (4 - 1) = 0).
    import floor_split
    assert floor_split.split(5, 2, 4, 1) == {"gap": 1, "raised_floor": 1, "beyond": 0}
    assert floor_split.split(9, 2, 4, 1) == {"gap": 5, "raised_floor": 1, "beyond": 4}
    row = {"model": "mix-w2s", "asr": 0.25, "asr_floor": 0.1}
    assert floor_split.counts(row, 20) == (5, 2, 20)
    assert floor_split.counts(dict(row, n_asr=40), 20) == (10, 4, 40)       # the row's own n_asr comes first
    with pytest.raises(SystemExit, match="not a count of 30"):
        floor_split.counts(row, 30)                                          # 0.25 * 30 = 7.5 sentences
    with pytest.raises(SystemExit, match="give --n-asr"):
        floor_split.counts(row, None)
    clean = {"rows": [{"model": "clean", "asr": 0.2, "asr_floor": 0.05}]}
    lines = floor_split.table({"rows": [row]}, clean, 20).splitlines()
    assert lines[0] == "clean model: ASR 0.200 (4), floor 0.050 (1) of 20"
    assert lines[-1] == "| mix-w2s | 0.250 (5) | 0.100 (2) | 0.050 (1) | 0.050 (1) | 0.000 (0) |"
