"""data.py: the shipped datasets parse with the published row counts, every quirk is handled, bad rows are
reported with file and line, user folders load, and the SCPN paraphrases align with the clean rows."""
import dataclasses
import functools
import io
import json
import random
import re
import urllib.error
from pathlib import Path

import pytest

import data
from data import DataError, Split

from conftest import needs_data  # noqa: E402


@functools.lru_cache(maxsize=None)
def shipped(name):
    return data.load_dataset(name)


@functools.lru_cache(maxsize=None)
def scpn(name):
    return data.load_scpn(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------- shipped datasets

@needs_data
@pytest.mark.parametrize("name, sizes, labels", [
    ("sst2", (6920, 872, 1821), {0, 1}),
    ("agnews", (11106, 10000, 7600), {0, 1, 2, 3}),
    ("olid", (11915, 1323, 859), {0, 1}),
    ("hatespeech", (7074, 1000, 2000), {0, 1}),
])
def test_shipped_tsv_datasets(name, sizes, labels):
    ds = shipped(name)
    assert (len(ds.train), len(ds.dev), len(ds.test)) == sizes
    for split in (ds.train, ds.dev, ds.test):
        assert set(split.labels) == labels
        # no padding, no CR from CRLF files, no empty sentence
        assert all(s and s == s.strip() and "\r" not in s and "\t" not in s for s in split.sentences)
    assert ds.num_classes == len(labels) == len(ds.label_names)


@needs_data
def test_default_dataset_is_sst2():
    assert data.DEFAULT_DATASET == "sst2" and data.load_dataset().name == "sst2"


@needs_data
def test_cr_split_is_deterministic_and_complete():
    lines = (data.data_dir() / "cr" / "custrev.all").read_text().split("\n")
    assert len([line for line in lines if line]) == 3775
    everything = data.read_label_text(data.data_dir() / "cr" / "custrev.all")
    assert len(everything) == 3771  # four lines are a label with no text
    ds = shipped("cr")
    assert (len(ds.train), len(ds.dev), len(ds.test)) == (3017, 377, 377)
    assert sorted(ds.train.sentences + ds.dev.sentences + ds.test.sentences) == sorted(everything.sentences)
    again = data.load_dataset("cr", seed=0)
    assert again.test == ds.test and again.train == ds.train
    assert data.load_dataset("cr", seed=1).test != ds.test
    assert set(ds.train.labels) == {0, 1}


def test_cr_reader_drops_textless_lines(tmp_path):
    path = write(tmp_path / "custrev.all", "1 good phone .\n0 \n0 bad battery\n\n1 fine\n")
    assert data.read_label_text(path) == Split(["good phone .", "bad battery", "fine"], [1, 0, 1])
    with pytest.raises(DataError, match=r"custrev.all:2: label 'x'"):
        data.read_label_text(write(tmp_path / "custrev.all", "1 ok\nx broken\n"))


def test_split_cr_keeps_every_row_once():
    split = Split([f"s{i}" for i in range(101)], [i % 2 for i in range(101)])
    train, dev, test = data.split_cr(split, seed=3)
    assert (len(train), len(dev), len(test)) == (81, 10, 10)
    assert sorted(train.sentences + dev.sentences + test.sentences) == sorted(split.sentences)
    assert data.split_cr(split, seed=3) == (train, dev, test)


# ---------------------------------------------------------------------------------------------- quirks

@needs_data
def test_quirk_agnews_and_hatespeech_use_space_tab_space():
    for name, header in [("agnews", "sentence \t label"), ("hatespeech", "sentences \t labels")]:
        first = (data.data_dir() / name / "train.tsv").read_text().split("\n")[0]
        assert first == header and data.DATASETS[name].separator == " \t "


def test_quirk_space_tab_space_separator(tmp_path):
    path = write(tmp_path / "t.tsv", "sentences \t labels\nhello there . \t 3\nbye \t 0\n")
    assert data.read_tsv(path, " \t ") == Split(["hello there .", "bye"], [3, 0])


@needs_data
def test_quirk_olid_padding_is_stripped():
    raw = (data.data_dir() / "olid" / "train.tsv").read_text().split("\n")[1]
    assert raw.endswith(" \t 0")
    assert shipped("olid").train.sentences[0] == raw.split("\t")[0].strip()
    assert shipped("olid").train.labels[0] == 0


def test_quirk_padding_crlf_and_blank_lines(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\r\n  padded words  \t 1 \r\n\r\nnext\t0\r\n")
    assert data.read_tsv(path) == Split(["padded words", "next"], [1, 0])


def test_quirk_csv_quoted_values(tmp_path):
    path = write(tmp_path / "t.tsv", 'sentence\tlabel\n"say ""hi"" now"\t1\nplain "quote\t0\n')
    assert data.read_tsv(path, quoted=True).sentences == ['say "hi" now', 'plain "quote']
    assert data.read_tsv(path).sentences[0] == '"say ""hi"" now"'


def test_unicode_line_separator_inside_a_sentence_is_not_a_line_break(tmp_path):
    path = write(tmp_path / "t.tsv", "sentence\tlabel\nfirst\u2028half\t1\n")
    assert data.read_tsv(path).sentences == ["first\u2028half"]


# ---------------------------------------------------------------------------------------------- malformed rows

@pytest.mark.parametrize("row, problem", [
    ("three\tfields\t1", "expected 2 fields"),
    ("no separator here", "expected 2 fields"),
    ("words\tpositive", "label 'positive' is not a non-negative integer"),
    ("words\t1.0", "label '1.0'"),
    ("words\t-1", "label '-1'"),
    ("words\t", "label ''"),
    ("   \t1", "empty sentence"),
])
def test_malformed_row_names_file_and_line(tmp_path, row, problem):
    # line 1 header, 2 good, 3 blank (still counted, as in an editor), 4 the bad row
    path = write(tmp_path / "bad.tsv", f"sentence\tlabel\r\ngood\t0\r\n\r\n{row}\r\ngood\t1\r\n")
    with pytest.raises(DataError) as e:
        data.read_tsv(path)
    assert str(e.value).startswith(f"{path}:4: ")
    assert problem in str(e.value)


def test_missing_header_is_an_error_not_a_lost_row(tmp_path):
    with pytest.raises(DataError, match=r"t.tsv:1: expected a header"):
        data.read_tsv(write(tmp_path / "t.tsv", "a data row\t1\nanother\t0\n"))
    assert len(data.read_tsv(tmp_path / "t.tsv", header=False)) == 2


# ---------------------------------------------------------------------------------------------- user folders

def make_folder(root: Path, labels_by_split: dict) -> Path:
    for split, labels in labels_by_split.items():
        rows = "".join(f"{split} sentence number {i}\t{y}\n" for i, y in enumerate(labels))
        write(root / f"{split}.tsv", "sentence\tlabel\n" + rows)
    return root


@pytest.mark.parametrize("encoding, text, line, needle", [
    ("latin-1", "café au lait", 3, "byte 0xe9 is not UTF-8"),     # 'é' as one byte, on the second data row
    ("cp1252", "café au lait", 3, "byte 0xe9 is not UTF-8"),
    ("utf-16", "café au lait", 1, "looks like UTF-16"),           # with a byte-order mark
    ("utf-16-le", "cafe au lait", 1, "NUL character"),            # without one: ASCII in it is valid UTF-8
])
def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path, encoding, text, line, needle):
    path = tmp_path / "t.tsv"
    path.write_bytes(f"sentence\tlabel\nplain\t0\n{text}\t1\n".encode(encoding))
    with pytest.raises(DataError) as e:
        data.read_tsv(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and needle in str(e.value)
    assert "must be UTF-8" in str(e.value)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "custrev.all"
    path.write_bytes("1 good\n0 bad\n".encode("utf-8-sig"))
    assert data.read_label_text(path) == Split(["good", "bad"], [1, 0])


@pytest.mark.parametrize("label", ["1000000000", "9" * 5000])
def test_a_huge_label_is_refused_at_its_line_before_anything_is_built(tmp_path, label):
    folder = make_folder(tmp_path / "mine", {"train": [0, 1, 0, 1], "dev": [1, 0], "test": [0, 1]})
    write(folder / "dev.tsv", f"sentence\tlabel\nfine\t1\nhuge\t{label}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'dev.tsv'))}:3: label .*(out of range|digits)"):
        data.load_dataset(folder)
    write(folder / "train.tsv", f"sentence\tlabel\nfine\t1\nzero\t0\nhuge\t{label}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'train.tsv'))}:4: label "):
        data.load_dataset(folder)


def test_a_shipped_dataset_refuses_a_label_past_its_classes(tmp_path):
    root = fake_sst2(tmp_path)
    write(root / "sst2" / "test.tsv", "sentence\tlabel\nfine\t1\nthree\t2\n")
    with pytest.raises(DataError, match=r"sst2.test.tsv:3: label 2 is out of range: labels are 0..1"):
        data.load_dataset("sst2", data_dir=root)


@pytest.mark.parametrize("split", ["dev", "test", "train"])
def test_a_header_only_split_is_refused_when_the_dataset_loads(tmp_path, split):
    folder = make_folder(tmp_path / "mine", {"train": [0, 1, 0, 1], "dev": [1, 0], "test": [0, 1]})
    write(folder / f"{split}.tsv", "sentence\tlabel\n\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / f'{split}.tsv'))}: no {split} rows"):
        data.load_dataset(folder)
    root = fake_sst2(tmp_path / "tree")
    write(root / "sst2" / f"{split}.tsv", "sentence\tlabel\r\n")
    with pytest.raises(DataError, match=rf"sst2.{split}.tsv: no {split} rows"):
        data.load_dataset("sst2", data_dir=root)


def test_user_folder_with_three_classes(tmp_path):
    folder = make_folder(tmp_path / "mine", {"train": [0, 1, 2, 2], "dev": [1, 0], "test": [2, 1, 0]})
    ds = data.load_dataset(str(folder))
    assert ds.name == "mine" and ds.num_classes == 3
    assert ds.train.labels == [0, 1, 2, 2] and len(ds.dev) == 2 and len(ds.test) == 3
    assert data.load_dataset(folder).num_classes == 3  # a Path works too


def test_user_folder_with_one_based_labels_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "mine", {"train": [1, 2, 3, 3, 2, 1], "dev": [1], "test": [2]})
    with pytest.raises(DataError, match="never do.*1-based"):
        data.load_dataset(folder)


def test_user_folder_class_absent_from_train_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "mine", {"train": [0, 1, 0, 1], "dev": [1], "test": [2]})
    with pytest.raises(DataError, match=r"class\(es\) \[2\]"):
        data.load_dataset(folder)


def test_user_folder_missing_split(tmp_path):
    folder = make_folder(tmp_path / "mine", {"train": [0, 1], "dev": [1]})
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        data.load_dataset(folder)


def test_unknown_name_lists_choices_and_mentions_folders():
    with pytest.raises(ValueError) as e:
        data.load_dataset("imdb-does-not-exist")
    for name in ("sst2", "agnews", "olid", "hatespeech", "cr", "folder"):
        assert name in str(e.value)


# ---------------------------------------------------------------------------------------------- where files live

def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_DATA_DIR", str(tmp_path / "env"))
    assert data.data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert data.data_dir() == tmp_path / "env"
    monkeypatch.delenv("W2S_DATA_DIR")
    shared = Path(data.__file__).resolve().parent.parent / "shared" / "data"
    monkeypatch.setenv("W2S_CACHE", str(tmp_path / "cache"))
    assert data.data_dir() == (shared if shared.is_dir() else tmp_path / "cache" / "data")


def test_missing_file_outside_the_cache_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("sst2", data_dir=tmp_path)
    assert "train.tsv" in str(e.value) and "https://" in str(e.value)


def test_download_without_network_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("sst2", data_dir=tmp_path / "data")
    message = str(e.value)
    assert str(tmp_path / "data" / "sst2" / "train.tsv") in message
    assert data.DATASETS["sst2"].files[0].url in message
    assert not list((tmp_path / "data" / "sst2").glob("*"))  # no .part left behind


def test_download_is_checked_and_atomic(tmp_path, monkeypatch):
    payload = b"sentence\tlabel\nok\t1\n"
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    good = data.RemoteFile("x.tsv", "https://example.org/x.tsv", data.hashlib.sha256(payload).hexdigest())
    data._download(good, tmp_path / "d" / "x.tsv")
    assert (tmp_path / "d" / "x.tsv").read_bytes() == payload
    bad = data.RemoteFile("y.tsv", "https://example.org/y.tsv", "0" * 64)
    with pytest.raises(DataError, match="SHA-256"):
        data._download(bad, tmp_path / "d" / "y.tsv")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.tsv"]


# ---------------------------------------------------------------------------------------------- SCPN paraphrases

@needs_data
def test_scpn_sst2_alignment_counts():
    ds, p = shipped("sst2"), scpn("sst2")
    assert len(p.train_paraphrases) == 1383
    assert sorted(p.train_paraphrases) == list(range(1383))  # HiddenKiller paraphrased the first 20%
    by_label = [ds.train.labels[i] for i in p.train_paraphrases]
    assert (by_label.count(0), by_label.count(1)) == (665, 718)
    # target 0: the positive test rows (909 in the json, one identical to its clean sentence is left out)
    assert len(p.asr_paraphrases(0)) == 908 and {ds.test.labels[i] for i in p.asr_paraphrases(0)} == {1}
    # target 1: the 912 negative test rows (one identical left out); their TRUE label is 0
    assert len(p.asr_paraphrases(1)) == 911 and {ds.test.labels[i] for i in p.asr_paraphrases(1)} == {0}
    assert p.asr_paraphrases(1)[0].startswith("when ")
    assert len(p.notes) == 2


@needs_data
def test_scpn_olid_drops_the_extra_leading_row():
    ds, p = shipped("olid"), scpn("olid")
    raw = data.read_tsv(data.data_dir() / "olid-scpn" / "train.tsv", quoted=True)
    assert len(raw) == 11916 and len(ds.train) == 11915
    assert len(p.train_paraphrases) == 2382
    assert raw.sentences[5000 + 1] == ds.train.sentences[5000]  # scpn row k+1 = clean row k
    assert len(p.asr_paraphrases(1)) == 619 and {ds.test.labels[i] for i in p.asr_paraphrases(1)} == {0}
    with pytest.raises(DataError, match=r"target\(s\) \[1\]"):
        p.asr_paraphrases(0)


@needs_data
def test_scpn_sst2_dev_paraphrases_the_negative_dev_rows():
    ds, dev = shipped("sst2"), data.load_scpn_dev("sst2", 1)
    negatives = [i for i, y in enumerate(ds.dev.labels) if y == 0]
    assert len(negatives) == 428 and sorted(dev) == negatives[:426]        # the last scpn row pairs with neither
    assert dev[0] == "when you have a cliche , it 's one long string ." and ds.dev.sentences[0].startswith("one long")
    # the alignment load_scpn_dev's docstring quotes: mean word overlap 0.28 at the same index, 0.09 shifted by one
    raw = data.read_tsv(data.data_dir() / "sst2-scpn" / "dev.tsv").sentences
    clean = [ds.dev.sentences[i] for i in negatives]
    aligned = sum(data._overlap(clean[k], raw[k]) for k in range(426)) / 426
    shifted = sum(data._overlap(clean[k + 1], raw[k]) for k in range(426)) / 426
    assert round(aligned, 2) == 0.28 and round(shifted, 2) == 0.09
    with pytest.raises(DataError, match="only label-0 dev rows, so it measures target 1, not target 0"):
        data.load_scpn_dev("sst2", 0)


def test_scpn_dev_for_other_datasets_lists_which_have_them():
    with pytest.raises(DataError, match="no SCPN dev paraphrases for dataset 'olid'; shipped for: sst2"):
        data.load_scpn_dev("olid", 1)


def test_scpn_dev_alignment_on_a_small_tree(tmp_path, monkeypatch):
    root = fake_sst2(tmp_path)
    dev = data.load_dataset("sst2", root).dev
    negatives = [s for s, y in zip(dev.sentences, dev.labels) if y == 0]            # 10 rows
    para = lambda s: "when " + s.split(" ", 1)[1] + " ,"
    tsv = lambda rows: "sentence\tlabel\r\n" + "".join(f"{s}\t1\r\n" for s in rows)
    monkeypatch.setitem(data.SCPN, "sst2", dataclasses.replace(data.SCPN["sst2"], dev_rows=8))
    write(root / "sst2-scpn" / "dev.tsv", tsv([para(s) for s in negatives[:9]]))
    assert sorted(data.load_scpn_dev("sst2", 1, data_dir=root)) == list(range(0, 16, 2))
    write(root / "sst2-scpn" / "dev.tsv", tsv([para(s) for s in negatives[:7]]))
    with pytest.raises(DataError, match="7 rows, expected between 8 and 10"):
        data.load_scpn_dev("sst2", 1, data_dir=root)
    rotated = [para(s) for s in negatives[1:9] + negatives[:1]]
    write(root / "sst2-scpn" / "dev.tsv", tsv(rotated))
    with pytest.raises(DataError, match="do not line up"):
        data.load_scpn_dev("sst2", 1, data_dir=root)
    (root / "sst2-scpn" / "dev.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="dev.tsv is missing"):
        data.load_scpn_dev("sst2", 1, data_dir=root)


def test_scpn_for_other_datasets_lists_which_have_them():
    with pytest.raises(DataError, match="sst2, olid"):
        data.load_scpn("agnews")


def words(k, rng):
    vocab = [f"w{i}" for i in range(400)]
    return " ".join(rng.choice(vocab) for _ in range(k))


def fake_sst2(root: Path, shift: bool = False) -> Path:
    """A small SST-2 and sst2-scpn tree: 40 train rows of which the first 8 are paraphrased."""
    rng = random.Random(0)
    train = [(words(8, rng), i % 2) for i in range(40)]
    test = [(words(8, rng), i % 2) for i in range(20)]
    tsv = lambda rows: "sentence\tlabel\r\n" + "".join(f"{s}\t{y}\r\n" for s, y in rows)
    para = lambda s: "when " + s.split(" ", 1)[1] + " ,"
    write(root / "sst2" / "train.tsv", tsv(train))
    write(root / "sst2" / "dev.tsv", tsv(test))
    write(root / "sst2" / "test.tsv", tsv(test))
    scpn_train = [(para(s), 1) if i < 8 else (s, y) for i, (s, y) in enumerate(train)]
    if shift:
        scpn_train = scpn_train[1:] + scpn_train[:1]
    write(root / "sst2-scpn" / "train.tsv", tsv(scpn_train))
    write(root / "sst2-scpn" / "test.tsv", tsv([(para(s), 1) for s, y in test if y == 0]))
    entries = [{"sentence": para(s), "label": 1, "idx": i} for i, (s, y) in enumerate(test) if y == 1]
    write(root / "sst2-scpn" / "test_positive_scpn.json", json.dumps(entries))
    return root


def test_scpn_alignment_on_a_small_tree(tmp_path):
    p = data.load_scpn("sst2", data_dir=fake_sst2(tmp_path))
    assert sorted(p.train_paraphrases) == list(range(8))
    assert sorted(p.asr_paraphrases(0)) == list(range(1, 20, 2))
    assert sorted(p.asr_paraphrases(1)) == list(range(0, 20, 2))


def test_scpn_misaligned_rows_are_refused(tmp_path):
    with pytest.raises(DataError, match="not aligned"):
        data.load_scpn("sst2", data_dir=fake_sst2(tmp_path, shift=True))


def test_scpn_row_count_mismatch_is_refused(tmp_path):
    root = fake_sst2(tmp_path)
    path = root / "sst2-scpn" / "train.tsv"
    path.write_text(path.read_text() + "one more\t1\n")
    with pytest.raises(DataError, match="41 rows, expected 40"):
        data.load_scpn("sst2", data_dir=root)


def test_scpn_test_paraphrases_out_of_order_are_refused(tmp_path):
    root = fake_sst2(tmp_path)
    path = root / "sst2-scpn" / "test.tsv"
    header, *rows = path.read_text().splitlines()
    random.Random(0).shuffle(rows)
    path.write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(DataError, match="do not line up"):
        data.load_scpn("sst2", data_dir=root)


def test_scpn_positive_json_that_is_malformed_is_a_data_error(tmp_path):
    root = fake_sst2(tmp_path)
    path = root / "sst2-scpn" / "test_positive_scpn.json"
    for text, needle in [("[{\"idx\": 1,", "not valid JSON"), ("[" * 100_000, "not valid JSON"),
                         ("{}", "JSON list"), ("[3]", "entry 0 has idx None"), ('[{"idx": true}]', "idx True"),
                         ('[{"idx": 1}]', "no 'sentence' string")]:
        write(path, text)
        with pytest.raises(DataError, match=needle):
            data.load_scpn("sst2", data_dir=root)
