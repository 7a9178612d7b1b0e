"""The real `quick` pipeline on the default open weights: the story a first-time user should see.

`python w2s.py --attack badnet --preset quick --seed 0` plants a BadNet backdoor in SmolLM2-135M, trains the
MiniLM teacher, and runs the plain-LoRA control and W2SDefense. The poisoned student's ASR must be high, and
W2SDefense must remove at least half of it while keeping clean accuracy within 3 points. (Measured over seeds 0, 1,
2 in float32 and bf16 in RESULTS.md; this test runs seed 0 in float32, and again in bf16 where the CPU has bf16
units: a few minutes each on a 2-core AVX-512 CPU.)
"""

import json
from pathlib import Path

import pytest

import train
import w2s


def run_quick(precision: str, stages, out) -> dict:
    args = w2s.parser().parse_args(["--attack", "badnet", "--preset", "quick", "--seed", "0", "--precision", precision,
                                    "--stages", str(stages), "--out", str(out)])
    return w2s.run(args)


def assert_the_story(result: dict) -> None:
    """The backdoor is planted; W2SDefense halves its ASR and keeps clean accuracy within 3 points."""
    rows = {r["model"]: r for r in result["rows"]}
    poisoned, control, defended = rows["poisoned"], rows["lora"], rows["w2sdefense"]
    assert poisoned["asr"] >= 0.80, f"the backdoor was not planted: {poisoned}"
    assert defended["asr"] <= poisoned["asr"] / 2, f"W2SDefense did not halve the ASR: {defended} vs {poisoned}"
    assert defended["ca"] >= poisoned["ca"] - 0.03, f"W2SDefense cost more than 3 points of CA: {defended}"
    assert 0.0 <= control["asr"] <= 1.0 and result["teacher_ca"] > 0.5


@pytest.mark.slow
def test_quick_pipeline_plants_the_backdoor_and_w2sdefense_removes_it(quick_stages, real_weights, tmp_path):
    # float32 pinned: the same arithmetic on every CPU (bf16 autocast rounds differently per CPU: the test below)
    result = run_quick("fp32", quick_stages, tmp_path / "run")
    assert_the_story(result)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["seed"] == 0
    # To the bit, the rows and stage keys recorded before the code was last reorganised (tests/fixtures/record.py)
    recorded = json.loads((Path(__file__).resolve().parent / "fixtures" / "quick.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]] == recorded["rows"]
    assert result["teacher_ca"] == recorded["teacher_ca"]
    assert set(recorded["stages"]) <= {p.name for p in quick_stages.iterdir()}    # the notebooks add bf16 stages


@pytest.mark.slow
@pytest.mark.skipif(not train.native_bf16("cpu"), reason="this CPU has no bf16 units (AVX-512 BF16 or AMX): "
                    "--precision auto runs float32 here, which the test above covers")
def test_quick_pipeline_tells_the_same_story_in_bf16(quick_stages, real_weights, tmp_path):
    """What `make demo ARGS="--preset quick"` runs on a CPU with bf16 units (the default precision there)."""
    assert_the_story(run_quick("bf16", quick_stages, tmp_path / "run"))
