"""SentencePiece tokenizer: trained on the built-in world's text on first use, or loaded from a file.

Ids of a tokenizer trained here: pad 0, unk 1, bos 2, eos 3 (the tiny configs' model ids agree).
`tokenize` gives the fixed-length rows the models read: [bos] + pieces + [eos] + pad...
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from vlm_jax.data.token_rows import pack

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "char")
MODEL_FILENAME = "tokenizer.model"


class Tokenizer:
    """A sentencepiece model plus the fixed-length batch encoding that the models consume."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        # A foreign model may lack some special ids (sentencepiece reports -1): there is then no
        # bos to prepend, and padding falls back to 0 so that rows stay valid embedding indices.
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else 0
        self.unk_id = processor.unk_id()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()

    @property
    def vocab_size(self) -> int:
        """Number of ids (pieces) in the model, specials included."""
        return int(self._sp.get_piece_size())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads any sentencepiece .model file; a clear error when it does not exist."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            processor = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on junk
            raise ValueError(f"{path!r} is not a sentencepiece model: {e}") from e
        return cls(processor, path)

    @classmethod
    def train(
        cls, texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int, model_type: str = "bpe"
    ) -> Tokenizer:
        """Trains a model on texts and writes it atomically to `<model_prefix>.model`: BPE, or
        model_type "char" (one piece per character, for character-level encoders)."""
        if model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer model_type {model_type!r}: choose one of {MODEL_TYPES}")
        path = os.fspath(model_prefix) + ".model"
        proto = _train_proto(texts, vocab_size, model_type)
        _atomic_write(path, proto)
        return cls(spm.SentencePieceProcessor(model_proto=proto), path)

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, without bos/eos."""
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> piece ids per text (one call into sentencepiece for the whole list)."""
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; stops at the first eos and ignores pad/bos, so model outputs decode as-is."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id) or not 0 <= i < self.vocab_size:
                continue
            out.append(i)
        return self._sp.decode(out)

    def pieces(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Ids -> their sentencepiece pieces ('\u2581' marks a word start), one per id up to the
        first eos (excluded), so piece j is still ids[j]; pad/bos/out-of-range ids give ''."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == self.eos_id:
                break
            special = i in (self.pad_id, self.bos_id) or not 0 <= i < self.vocab_size
            out.append("" if special else self._sp.id_to_piece(i))
        return out

    def tokenize(
        self, texts: Sequence[str], length: int, *, return_truncated: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Texts -> int32 [N, length] rows of [bos] + pieces + [eos] + pad (+ bool [N] truncated)."""
        ids = self.encode_batch(texts)
        tokens, truncated = pack(ids, length, self.bos_id, self.eos_id, self.pad_id)
        return (tokens, truncated) if return_truncated else tokens


def load_or_train(config: Any, workdir: str | os.PathLike | None) -> Tokenizer:
    """config.tokenizer.path if set, else <workdir>/tokenizer.model, else train on the world text.
    tokenizer.kind "clip_bpe": CLIP's byte-level BPE from the folder at tokenizer.path (vocab.json +
    merges.txt; vlm_jax.data.clip_bpe.ClipTokenizer, same interface)."""
    kind = str(config.tokenizer.get("kind", "sentencepiece") or "sentencepiece")
    path = str(config.tokenizer.get("path", "") or "")
    if kind == "clip_bpe":
        from vlm_jax.data.clip_bpe import ClipTokenizer

        if not path:
            raise ValueError("tokenizer.kind 'clip_bpe' needs tokenizer.path: the folder with vocab.json and "
                             "merges.txt")
        return ClipTokenizer.load(os.path.expanduser(path))
    if kind != "sentencepiece":
        raise ValueError(f"tokenizer.kind {kind!r}: choose 'sentencepiece' or 'clip_bpe'")
    if path:
        return Tokenizer.load(os.path.expanduser(path))
    if workdir is None:
        raise ValueError("set config.tokenizer.path or give a workdir to keep the trained tokenizer")
    workdir = os.fspath(workdir)
    model_path = os.path.join(workdir, MODEL_FILENAME)
    if os.path.isfile(model_path):
        return Tokenizer.load(model_path)
    # Imported late: only a first run needs the world's text.
    from vlm_jax.data import text, world

    os.makedirs(workdir, exist_ok=True)
    seed = int(config.data.world_seed)
    source = str(config.data.source)
    if source in text.SOURCES:
        # Language models also meet the instruction prompts and sums: their tokenizer learns those too.
        texts = text.tokenizer_corpus(seed)
    elif source == "world":
        texts = world.text_corpus(seed=seed)
    else:  # caption files (coco, karpathy, jsonl): the training split's captions
        texts = _caption_corpus(config)
    return Tokenizer.train(texts, model_path[: -len(".model")], int(config.tokenizer.vocab_size),
                           str(config.tokenizer.get("model_type", "bpe")))


def _caption_corpus(config: Any) -> Iterable[str]:
    from vlm_jax.data import sources

    train = sources.make_source(config, "train")
    for i in range(len(train)):
        yield from (c for c in train[i].get("captions", ()) if c)


def _train_proto(texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> bytes:
    """Runs the sentencepiece trainer in memory and returns the serialised model."""
    buf = io.BytesIO()
    # Keep only non-empty lines: sentencepiece counts an empty line as a sentence of nothing.
    sentences = (t for t in texts if t and t.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=buf,
        vocab_size=int(vocab_size),
        # BPE: on the world's small vocabulary unigram stops early with words split into pieces
        # ("▁a" "nd"); BPE keeps whole words, so captions fit in fewer tokens.
        model_type=model_type,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Lowercase (case-folding) normalisation: captions differ in case only by accident.
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0,
        # The world's vocabulary is small: a hard limit would fail where there are fewer
        # distinct pieces than vocab_size; the model then simply uses fewer ids.
        hard_vocab_limit=False,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    return buf.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    """Writes via a temp file and rename, so concurrent hosts never read a half-written model."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
