"""The readers of finished runs and screens (experiments/collect_results.py, screen_gate.py, seed_spread.py,
floor_split.py), by hand on small made-up results."""

import json
import math

import pytest


def test_collect_results_mean_and_sample_std_by_hand():
    # experiments/collect_results.py prints RESULTS.md's tables. ASR 0.1 and 0.3: mean 0.2, sample std
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
    # experiments/screen_gate.py reads a screen's gate. Planted students: dev ASR 0.08 and 0.14 -> mean 0.11 (over 0.10);
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
    # experiments/seed_spread.py: variances 0.005 ([0.1, 0.2]) and 0.03 ([0.3, 0.3, 0.6]) pool to sqrt(0.0175) = 0.1323.
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
    # experiments/floor_split.py: of 20 sentences, a defended model calls 5 with the trigger and 2 without it the target;
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
