"""CLIP's byte-level BPE tokenizer, read from a Hugging Face / Stable Diffusion tokenizer folder.

A folder holds vocab.json (token -> id) and merges.txt (one "left right" merge per line, best first,
after a "#version" header), and optionally special_tokens_map.json / tokenizer_config.json naming the
special tokens. Stable Diffusion 1.x pads with <|endoftext|> (id 49407), 2.x with "!" (id 0).

Encoding follows transformers' CLIPTokenizer (the `tokenizers`-backed one of transformers 5, which never
uses ftfy), so converted CLIP and Stable Diffusion text encoders see the ids they were ported with:

1. special tokens written literally in the text (exactly, case included) become their ids;
2. the rest is NFC-normalised and lower-cased character by character (so a final capital sigma
   lowers to 'σ', not 'ς');
3. it is cut into words: the two special-token spellings, the contractions 's 't 're 've 'm 'll 'd,
   runs of letters, single digits (any Unicode number), and runs of anything else that is not
   whitespace; whitespace only separates;
4. each word's UTF-8 bytes are spelled with the 256 printable characters of the byte table, "</w>"
   is appended to its last symbol, and merges are applied best rank first.

Deliberate difference from transformers: a pad token that is an ordinary piece (Stable Diffusion
2.x's "!") stays ordinary text, as in the OpenCLIP tokenizer those models were trained with;
transformers turns every "!" of a prompt into the pad id (huggingface/diffusers#4153).
OpenAI's original tokenizer also ran ftfy and HTML unescaping, which is not done here either.

Decoding joins the pieces, maps the byte table back to UTF-8 and turns each "</w>" into a space.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from vlm_jax.data.token_rows import pack

VOCAB_FILENAME = "vocab.json"
MERGES_FILENAME = "merges.txt"
SPECIAL_TOKENS_FILENAME = "special_tokens_map.json"
CONFIG_FILENAME = "tokenizer_config.json"
END_OF_WORD = "</w>"
DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# The two spellings CLIP's word pattern keeps whole; transformers then splits such a word (which only
# survives as a word when not written exactly, e.g. upper-case) into "<|", the name, "|>".
_SPECIAL_WORDS = ("<|startoftext|>", "<|endoftext|>")
# Unicode White_Space (what transformers' Oniguruma regex calls \s). Python's own \s and str.isspace
# also count \x1c-\x1f, which CLIP keeps as symbols.
_WHITESPACE = "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_CACHE_LIMIT = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """The byte table: each of the 256 byte values -> a printable character (printable Latin-1 bytes
    stand for themselves, the others for chr(256), chr(257), ... in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, spare = {}, 256
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(spare)
            spare += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _category_class(prefix: str) -> str:
    """A stdlib-`re` character class body for every code point whose general category starts with
    prefix ("L" letters, "N" numbers), from Python's unicodedata tables."""
    ranges, start, prev = [], None, None
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731 - escapes keep the class free of metacharacters
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


def _word_pattern_source(letters: str, numbers: str) -> str:
    specials = "|".join(re.escape(s) for s in _SPECIAL_WORDS)
    return (f"{specials}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]"
            f"|[^{_WHITESPACE}{letters}{numbers}]+")


@lru_cache(maxsize=2)
def word_pattern(prefer_regex: bool = True) -> Any:
    """CLIP's word pattern compiled with the `regex` module (\\p{L}, \\p{N}) when it is installed, else
    with the stdlib `re` and explicit letter/number classes; both agree wherever their Unicode
    versions do (transformers is not a dependency; the `regex` module comes with it)."""
    if prefer_regex:
        try:
            import regex
        except ImportError:
            pass
        else:
            return regex.compile(_word_pattern_source(r"\p{L}", r"\p{N}"))
    return re.compile(_word_pattern_source(_category_class("L"), _category_class("N")))


def _lower(text: str) -> str:
    """Character-by-character lower case, as transformers does: str.lower() alone would turn a
    word-final capital sigma into 'ς'."""
    low = text.lower()
    if "\u03c2" in low and "\u03a3" in text:
        low = "".join(c.lower() for c in text)
    return low


class ClipTokenizer:
    """CLIP's byte-level BPE with the interface of vlm_jax.data.tokenizer.Tokenizer."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = DEFAULT_SPECIALS["bos_token"],
        eos_token: str = DEFAULT_SPECIALS["eos_token"],
        unk_token: str = DEFAULT_SPECIALS["unk_token"],
        pad_token: str = DEFAULT_SPECIALS["pad_token"],
        path: str | None = None,
        model_max_length: int | None = None,
    ):
        self.path = path
        self.model_max_length = model_max_length
        self._vocab = dict(vocab)
        self._tokens = {i: t for t, i in self._vocab.items()}
        # A later duplicate of a merge takes the later rank (as transformers reads the file).
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        names = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for name, token in names.items():
            if token not in self._vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self.bos_id = self._vocab[bos_token]
        self.eos_id = self._vocab[eos_token]
        self.unk_id = self._vocab[unk_token]
        self.pad_id = self._vocab[pad_token]
        # Tokens BPE can make (the byte table, with or without </w>, and every merge's result) are
        # ordinary text; the other special tokens are cut out of the text before normalising.
        ordinary = {c for c in _BYTE_TO_CHAR.values()} | {c + END_OF_WORD for c in _BYTE_TO_CHAR.values()}
        ordinary |= {a + b for a, b in self._ranks}
        specials = sorted({t for t in names.values() if t not in ordinary}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._skip_ids = {self._vocab[t] for t in (bos_token, pad_token) if t not in ordinary}
        self._pattern = word_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids (one past the largest id in vocab.json), specials included."""
        return max(self._tokens) + 1

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ClipTokenizer:
        """Reads vocab.json + merges.txt (+ special_tokens_map.json / tokenizer_config.json) from a
        folder; a clear error naming the file when one is missing or malformed."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"CLIP tokenizer folder {folder!r} does not exist (it should hold {VOCAB_FILENAME} and "
                f"{MERGES_FILENAME})")
        vocab_path = os.path.join(folder, VOCAB_FILENAME)
        vocab = _read_vocab(vocab_path)
        merges = _read_merges(os.path.join(folder, MERGES_FILENAME), vocab)
        specials, sources, max_length = _read_special_tokens(folder)
        for name, token in specials.items():
            if token not in vocab:
                raise ValueError(f"{name} {token!r} (from {sources[name]}) is not in {vocab_path!r}")
        return cls(vocab, merges, path=folder, model_max_length=max_length, **specials)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, without bos/eos."""
        if self._special_re is None:
            return self._encode_plain(text)
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text[start:m.start()])
            ids.append(self._vocab[m.group()])
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> piece ids per text."""
        return [self.encode(t) for t in texts]

    def tokenize(
        self, texts: Sequence[str], length: int, *, return_truncated: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Texts -> int32 [N, length] rows of [bos] + pieces + [eos] + pad (+ bool [N] truncated)."""
        tokens, truncated = pack(self.encode_batch(texts), length, self.bos_id, self.eos_id, self.pad_id)
        return (tokens, truncated) if return_truncated else tokens

    def _encode_plain(self, text: str) -> list[int]:
        # Whitespace only separates words, so collapsing it first (as transformers does) changes nothing.
        text = _lower(unicodedata.normalize("NFC", text))
        ids: list[int] = []
        for word in self._pattern.findall(text):
            if word in _SPECIAL_WORDS:
                ids += self._word_ids(word[:2]) + self._word_ids(word[2:-2]) + self._word_ids(word[-2:])
            else:
                ids += self._word_ids(word)
        return ids

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            symbols = self._bpe("".join(_BYTE_TO_CHAR[b] for b in word.encode("utf-8")))
            ids = self._cache[word] = tuple(self._vocab.get(s, self.unk_id) for s in symbols)
        return ids

    def _bpe(self, chars: str) -> list[str]:
        """Byte-table characters of one word -> its BPE symbols: the adjacent pair with the best rank
        is merged everywhere (left to right), until no adjacent pair has a merge."""
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            left, right = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    # -- decoding -------------------------------------------------------------------------------

    def _kept(self, ids: Sequence[int] | np.ndarray) -> list[int | None]:
        """Ids up to the first eos (excluded); None for bos, a special pad and unknown ids."""
        out: list[int | None] = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            out.append(None if i in self._skip_ids or i not in self._tokens else i)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; stops at the first eos and ignores bos (and pad when it is a special token),
        so model outputs decode as-is. Words come back separated by single spaces, punctuation
        included ("a cat !"), lower-cased."""
        chars = "".join(self._tokens[i] for i in self._kept(ids) if i is not None)
        data = bytearray()
        for c in chars:
            b = _CHAR_TO_BYTE.get(c)
            if b is None:  # not a byte-table character (only possible in a foreign special token)
                data += c.encode("utf-8")
            else:
                data.append(b)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Ids -> their vocabulary tokens (byte-table spelling, "</w>" ends a word), one per id up to
        the first eos (excluded), so piece j is still ids[j]; bos, special pad and unknown ids give ''."""
        return ["" if i is None else self._tokens[i] for i in self._kept(ids)]


def _read_text(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP tokenizer {what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text: {e}") from e


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e


def _read_vocab(path: str) -> dict[str, int]:
    vocab = _read_json(path, "vocabulary")
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path!r} should be a non-empty JSON object of token -> id")
    bad = [(t, i) for t, i in vocab.items() if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"{path!r}: ids must be non-negative integers, got {bad[0][0]!r}: {bad[0][1]!r}")
    if len(set(vocab.values())) != len(vocab):
        seen: dict[int, str] = {}
        for t, i in vocab.items():
            if i in seen:
                raise ValueError(f"{path!r}: tokens {seen[i]!r} and {t!r} share id {i}")
            seen[i] = t
    return vocab


def _read_merges(path: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(_read_text(path, "merges file").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path!r} line {n}: expected two symbols separated by one space, got {line!r}")
        left, right = parts
        for symbol in (left, right, left + right):
            if symbol not in vocab:
                raise ValueError(f"{path!r} line {n}: merge {line!r} needs {symbol!r}, which "
                                 f"{VOCAB_FILENAME} lacks")
        merges.append((left, right))
    return merges


def _read_special_tokens(folder: str) -> tuple[dict[str, str], dict[str, str], int | None]:
    """(bos/eos/unk/pad token strings, where each came from, model_max_length): the defaults, then
    tokenizer_config.json, then special_tokens_map.json (which wins, as in transformers)."""
    specials = dict(DEFAULT_SPECIALS)
    sources = {name: "the CLIP default" for name in specials}
    max_length = None
    for filename in (CONFIG_FILENAME, SPECIAL_TOKENS_FILENAME):
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            continue
        data = _read_json(path, filename)
        if not isinstance(data, dict):
            raise ValueError(f"{path!r} should be a JSON object")
        for name in specials:
            value = data.get(name)
            if isinstance(value, dict):  # an AddedToken: {"content": ..., "lstrip": ..., ...}
                value = value.get("content")
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path!r}: {name} should be a token string, got {value!r}")
            specials[name], sources[name] = value, filename
        length = data.get("model_max_length")
        # transformers writes a huge placeholder (1e30) when there is no limit.
        if isinstance(length, int) and not isinstance(length, bool) and 0 < length < 1_000_000:
            max_length = length
    return specials, sources, max_length
