"""The pipeline end to end on tiny random models, the training loop's metrics, and the command line."""

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

import models
import stages
import train
import w2s
from conftest import needs_data  # noqa: E402
from tiny_world import make_tiny_world, tiny_args  # noqa: E402

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
    (["--rank", "0"], "argument --rank: 0 is outside 1 .. 16384"),
    (["--rank", "1000000000000"], "argument --rank: 1000000000000 is outside 1 .. 16384"),
    (["--gamma", "-1"], "argument --gamma: -1 is outside 0.0 .. inf"),
    (["--lora-layers", "0"], "argument --lora-layers: 0 is outside 1 .. inf"),
    (["--lora-targets", "q_proj nope"], "choose among q_proj, k_proj"),
    (["--attack-layers", "-2"], "argument --attack-layers: -2 is outside 1 .. inf"),
    (["--defense", "w2s-origin", "--fa", "normalized"], "needs the L2 feature distance"),
    (["--weights", "authors", "--gamma", "0.1"], "drop --gamma"),
    (["--poison-rate", "0.2"], "clean-label poisoning takes --n-poison"),           # the cpu preset is clean-label
    (["--poison-mode", "dirty", "--n-poison", "10"], "dirty takes --poison-rate"),
    (["--poison-mode", "dirty", "--poison-rate", "2"], "argument --poison-rate: 2 is outside 0.0 .. 1.0"),
    (["--target", "7"], "--target 7 is not a class of sst2 (0..1)"),
    (["--lr", "0"], "argument --lr: 0 must be greater than 0.0"),
    (["--lr", "nan"], "argument --lr: nan is not a finite number"),
    (["--attack-epochs", "inf"], "argument --attack-epochs: inf is not a finite number"),
    (["--epochs", "1e9"], "argument --epochs: 1e9 is outside -inf .. 1000.0"),
    (["--attack-lr=-1e-4"], "argument --attack-lr: -1e-4 must be greater than 0.0"),
    (["--insertions", "0"], "argument --insertions: 0 is outside 1 .. inf"),
    (["--insertions", "1000000000"], "--insertions must be at most the attacker's max length (64 tokens)"),
    (["--clean-size", "0"], "argument --clean-size: 0 is outside 1 .. inf"),
    (["--student", "nope"], "unknown student 'nope'; valid names are smollm2-135m, gpt2"),
    (["--teacher", "nope"], "unknown teacher 'nope'; valid names are minilm-l6, bert-base-uncased"),   # not after the attack
    (["--triggers", ""], "--triggers needs at least one word"),
    (["--attack", "insent", "--insent-sentence", " "], "--insent-sentence is empty"),
    (["--seed", "-1"], "argument --seed: -1 is outside 0 .. 4294967295"),
    (["--seed", "18446744073709551616"], "argument --seed: 18446744073709551616 is outside 0 .. 4294967295"),
    (["--unlearn-seed", "-5"], "argument --unlearn-seed: -5 is outside 0 .. 4294967295"),
    (["--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
    (["--device", "nope"], "--device 'nope' is not a torch device"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),      # no machine here has 100 GPUs
])
def test_cli_rejects_bad_input_before_any_work(argv, message, capsys, tmp_path):
    """One line on stderr and exit code 2, before anything is made: a number out of range as the command line is
    read (argparse), a combination that cannot work before the attack trains (checks.check_configs)."""
    try:
        code = w2s.main(argv + ["--stages", str(tmp_path / "s"), "--out", str(tmp_path / "o")])
    except SystemExit as e:                                       # argparse's own exit
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--stages", "--out"])
def test_a_folder_we_cannot_write_in_is_an_error_before_any_work(flag, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    other = "--out" if flag == "--stages" else "--stages"
    code = w2s.main([flag, str(blocker / "below"), other, str(tmp_path / "other")])
    assert code == 2 and f"error: {flag} {blocker / 'below'}: cannot write in {blocker}" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder" and not (tmp_path / "other").exists()


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




@pytest.mark.parametrize("test_labels, message", [
    (None, "its labels hold one class"),                                         # every split one class
    ([0, 0, 0, 0], "no test sentence labelled other than the target 0"),         # no ASR set to measure
])
def test_a_task_without_a_backdoor_to_measure_is_an_error_before_any_training(test_labels, message, tmp_path,
                                                                             capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    for split, n in (("train", 8), ("dev", 4), ("test", 4)):
        labels = test_labels if split == "test" and test_labels else [0 if test_labels is None else i % 2
                                                                      for i in range(n)]
        (ds / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"a fine film {i}\t{y}\n"
                                                                     for i, y in enumerate(labels)))
    code = w2s.main(["--dataset", str(ds), "--poison-mode", "clean", "--defense", "none", "--stages",
                     str(tmp_path / "s"), "--out", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
