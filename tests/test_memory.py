"""Each stage records what it cost in memory: its peak resident memory, beside its seconds, in its metrics, in
results.json and in the printed table. (How much a stage needs is measured by bench/memory_stages.py, not here.)"""

import json

import pytest
import torch

import stages
import w2s
from tiny_world import SHARED, make_tiny_world, tiny_args

pytest.importorskip("transformers")


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_every_stage_records_a_plausible_peak_and_the_table_shows_it(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    result = w2s.run(tiny_args(tmp_path, student, teacher, ds))
    process_peak = stages.process_peak_mb()
    assert set(result["peak_mb"]) == set(result["seconds"]) == {"attack", "teacher", "lora", "w2sdefense"}
    for name, peak in result["peak_mb"].items():
        assert 0 < peak <= process_peak + 1, f"stage {name}: peak {peak} MB, process peak {process_peak:.0f} MB"
    for folder in (tmp_path / "stages").iterdir():
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["peak_mb"] > 0 and metrics["peak_of"] in ("stage", "process")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["peak_mb"] == result["peak_mb"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| model | CA | ASR | floor | seconds | peak MB |" in table and stages.PEAK_LEGEND in table
    assert f"| {result['peak_mb']['w2sdefense']:.0f} |" in table

    again = w2s.run(tiny_args(tmp_path, student, teacher, ds))         # every stage cached: the cost when computed
    assert again["peak_mb"] == result["peak_mb"]


def test_a_stage_cached_before_peaks_were_measured_prints_a_dash():
    rows = [{"model": "poisoned", **stages.row_metrics({"ca": 0.9, "asr": 0.95, "seconds": 12.0})}]
    assert stages.markdown_table(rows, [None]).splitlines()[2] == "| poisoned | 0.900 | 0.950 | - | 12 | - |"
    assert stages.markdown_table(rows, [812.4]).splitlines()[2] == "| poisoned | 0.900 | 0.950 | - | 12 | 812 |"


def test_a_reset_peak_starts_a_new_one_and_the_process_peak_keeps_the_old():
    big = torch.ones(64 * 2 ** 20 // 4)                        # 64 MB, resident
    del big
    before = stages.process_peak_mb()
    cost = stages.StageCost()
    assert stages.process_peak_mb() >= before - 1                  # the reset kept the old peak
    assert 0 < cost.peak_mb() <= stages.process_peak_mb() + 1
