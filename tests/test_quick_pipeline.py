"""The real `quick` pipeline on the default open weights: the story a first-time user should see.

`python w2s.py --attack badnet --preset quick --seed 0` plants a BadNet backdoor in SmolLM2-135M, trains the
MiniLM teacher, and runs the plain-LoRA control and W2SDefense. The poisoned student's ASR must be high, and
W2SDefense must remove at least half of it while keeping clean accuracy within a few points. (Measured over
seeds 0, 1, 2 in RESULTS.md; this test runs seed 0 in float32: about 2 minutes on a 2-core AVX-512 CPU.)
"""

import json
from pathlib import Path

import pytest

import w2s


@pytest.mark.slow
def test_quick_pipeline_plants_the_backdoor_and_w2sdefense_removes_it(quick_stages, real_weights, tmp_path):
    # float32 pinned: the same arithmetic on every CPU (bf16 autocast, the default where the CPU has bf16
    # units, rounds differently, and at this small budget seed 0 then misses the story: RESULTS.md).
    args = w2s.parser().parse_args(["--attack", "badnet", "--preset", "quick", "--seed", "0", "--precision", "fp32",
                                    "--stages", str(quick_stages), "--out", str(tmp_path / "run")])
    result = w2s.run(args)
    rows = {r["model"]: r for r in result["rows"]}
    poisoned, control, defended = rows["poisoned"], rows["lora"], rows["w2sdefense"]
    assert poisoned["asr"] >= 0.80, f"the backdoor was not planted: {poisoned}"
    assert defended["asr"] <= poisoned["asr"] / 2, f"W2SDefense did not halve the ASR: {defended} vs {poisoned}"
    assert defended["ca"] >= poisoned["ca"] - 0.05, f"W2SDefense cost too much clean accuracy: {defended}"
    assert 0.0 <= control["asr"] <= 1.0 and result["teacher_ca"] > 0.5
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["seed"] == 0
    # To the bit, the rows and stage keys recorded before the code was last reorganised (tests/fixtures/record.py)
    recorded = json.loads((Path(__file__).resolve().parent / "fixtures" / "quick.json").read_text())
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]] == recorded["rows"]
    assert result["teacher_ca"] == recorded["teacher_ca"]
    assert set(recorded["stages"]) <= {p.name for p in quick_stages.iterdir()}    # the notebooks add bf16 stages
