"""A run killed mid-stage loses only that stage: SIGTERM ends it as Ctrl-C does, a rerun trains that stage again
and prints the same table as a run never interrupted, and no temporary file is left anywhere."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages
from tiny_world import SHARED, make_tiny_world, tiny_argv

ROOT = Path(__file__).resolve().parent.parent


def table(result: dict) -> dict:
    return {"rows": [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]],
            "teacher_ca": result["teacher_ca"]}


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs the GPT-2 tokenizer files")
def test_sigterm_during_a_stage_then_a_rerun_gives_the_uninterrupted_table_and_no_temp_file(tmp_path):
    student, teacher, ds = make_tiny_world(tmp_path)
    # The control alone, for long enough that the signal lands inside its stage.
    argv = [sys.executable, str(ROOT / "w2s.py"),
            *tiny_argv(tmp_path, student, teacher, ds, "--defense", "lora", "--epochs", "100")]
    log = (tmp_path / "log").open("w")                    # a file, not a pipe: the progress bars never block it
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "stages").glob("lora-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)                                  # the attack stage is done, the control has started
    assert proc.poll() is None, f"the run ended before the signal: {(tmp_path / 'log').read_text()[-2000:]}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    log.close()
    assert "interrupted: finished stages are kept" in (tmp_path / "log").read_text()
    control = next((tmp_path / "stages").glob("lora-*"))
    assert not (control / "metrics.json").exists()        # the interrupted stage is not a finished one
    assert (next((tmp_path / "stages").glob("attack-*")) / "metrics.json").exists()
    assert not (tmp_path / "run" / "results.json").exists()

    (control / ".lora.safetensors.stale.tmp").write_bytes(b"half a file")     # as a harder kill would leave
    rerun = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.rglob("*.tmp"))
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    once = argv + ["--stages", str(tmp_path / "once-stages"), "--out", str(tmp_path / "once")]
    assert subprocess.run(once, cwd=tmp_path, capture_output=True, text=True, timeout=600).returncode == 0
    assert table(resumed) == table(json.loads((tmp_path / "once" / "results.json").read_text()))


def test_open_stage_removes_a_killed_runs_temp_files_but_not_a_finished_stages(tmp_path):
    folder = tmp_path / "lora-abc"
    folder.mkdir()
    (folder / ".lora.safetensors.x1.tmp").write_bytes(b"half")
    (folder / "keep.txt").write_text("ours")
    assert stages.open_stage(folder) == (folder, None)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_the_report_is_written_results_md_first_and_results_json_last(tmp_path, monkeypatch):
    """A kill between the two writes leaves no results.json, never one that disagrees with results.md."""
    import w2s
    written = []
    real = w2s.weights.atomic_write

    def spy(path):
        written.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(w2s.weights, "atomic_write", spy)
    monkeypatch.setattr(stages.weights, "atomic_write", spy)
    student, teacher, ds = make_tiny_world(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")                 # an older run's report
    w2s.run(w2s.parser().parse_args(tiny_argv(tmp_path, student, teacher, ds, "--defense", "none")))
    report = [name for name in written if name.startswith("results")]
    assert report == ["results.md", "results.json"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
