"""The numbers a refactor must not move, to the bit: the tiny world under every defense (this file) and the quick
preset in float32 (``test_quick_pipeline.py``), against ``tests/fixtures/``, which ``tests/fixtures/record.py``
wrote. A change that is meant to move a number reruns that script and says so."""

import json
from pathlib import Path

import pytest

from tiny_world import SHARED

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_tiny_world_tables_stage_keys_and_step_losses_are_the_recorded_ones(tmp_path):
    from fixtures.record import tiny
    recorded = json.loads((FIXTURES / "tiny.json").read_text())
    now = tiny(tmp_path)
    assert list(now["stages"]) == list(recorded["stages"])
    assert now["runs"] == recorded["runs"]
    for name, steps in recorded["stages"].items():
        assert now["stages"][name] == steps, f"stage {name}'s per-step losses moved"
