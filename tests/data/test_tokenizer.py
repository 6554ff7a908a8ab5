"""Tokenizer: training, loading, ids, fixed-length encoding with truncation and padding."""

import os

import numpy as np
import pytest

from vlm_jax.config_defaults import base_config
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data.tokenizer import Tokenizer

CORPUS = [
    "a red circle on the left.",
    "a picture of a blue square and a green triangle.",
    "there is a small yellow ring in the center.",
    "an image with a large white cross.",
] * 50


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(CORPUS, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=128)


def test_train_writes_model_with_fixed_special_ids(tok):
    assert tok.path.endswith("spm.model") and os.path.isfile(tok.path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 4 < tok.vocab_size <= 128


def test_load_roundtrip(tok):
    loaded = Tokenizer.load(tok.path)
    text = "A Red circle and a blue square."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.decode(loaded.encode(text)) == text.lower()  # lowercase normalisation


def test_tokenize_layout(tok):
    pieces = tok.encode("a red circle.")
    out = tok.tokenize(["a red circle.", ""], length=12)
    assert out.dtype == np.int32 and out.shape == (2, 12)
    expect = [2] + pieces + [3]
    np.testing.assert_array_equal(out[0, : len(expect)], expect)
    assert (out[0, len(expect) :] == 0).all()
    np.testing.assert_array_equal(out[1], [2, 3] + [0] * 10)  # empty text


def test_truncation_keeps_eos(tok):
    long = "a picture of a blue square and a green triangle. " * 5
    out, truncated = tok.tokenize([long, "a ring."], length=8, return_truncated=True)
    np.testing.assert_array_equal(out[0], [2] + tok.encode(long)[:6] + [3])
    assert truncated.tolist() == [True, False]


def test_decode_stops_at_eos_and_skips_specials(tok):
    row = tok.tokenize(["a red circle."], 10)[0]
    assert tok.decode(row) == "a red circle."
    garbage_after_eos = np.concatenate([row[:6], [tok.eos_id], tok.encode("blue")])
    assert "blue" not in tok.decode(garbage_after_eos)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.load(junk)


def test_load_or_train_trains_on_world_then_reuses(tmp_path):
    config = base_config()
    config.tokenizer.vocab_size = 512
    tok = tokenizer_lib.load_or_train(config, tmp_path)
    path = tmp_path / "tokenizer.model"
    assert path.is_file() and tok.path == str(path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left nothing
    mtime = path.stat().st_mtime_ns
    again = tokenizer_lib.load_or_train(config, tmp_path)
    assert path.stat().st_mtime_ns == mtime and again.vocab_size == tok.vocab_size
    # World captions are whole-word pieces, so they stay short.
    assert len(tok.encode("a picture of a red circle and a blue square.")) <= 12
    # An explicit path wins; a missing one is a clear error.
    config.tokenizer.path = str(path)
    assert tokenizer_lib.load_or_train(config, tmp_path / "other").encode("red") == tok.encode("red")
    config.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer_lib.load_or_train(config, tmp_path)


def test_ids_agree_with_tiny_clip_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "clip_config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "clip.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    assert config.model.text.eos_id == tokenizer_lib.EOS_ID
    assert config.model.text.pad_id == tokenizer_lib.PAD_ID
    assert config.tokenizer.vocab_size <= config.model.text.vocab_size


def test_llama_tokenizer_model_loads_with_llama_ids(tmp_path):
    """A tokenizer.model with LLaMA's layout (unk 0, bos 1, eos 2, no pad, byte fallback, no
    normalisation) loads as is; prompts encode as [bos] + pieces, as transformers' LlamaTokenizer does."""
    import io
    import json

    import sentencepiece as spm

    texts = ["Hello world, this is a test of the LLaMA tokenizer.", "Below is an instruction.", "what is 3 plus 4? 7"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 100), model_writer=buf, vocab_size=300, model_type="bpe", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
        hard_vocab_limit=False, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok = Tokenizer.load(tmp_path / "tokenizer.model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.pad_id == 0  # no pad: rows pad with 0
    text = "Hello world!\nwhat is 3 plus 4?"
    assert tok.decode(tok.encode(text)) == text  # case, newline and unseen characters survive
    from vlm_jax.data import text as text_lib

    record = {"instruction": "what is 3 plus 4?", "input": "", "output": "7"}
    (ids, mask), = text_lib._Encode(text_lib._Records([record]), tok, 1024, False)(0, 0)["examples"]
    assert ids[0] == 1 and ids[-1] == 2 and (ids[1:-1] != 2).all()
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True})
    )
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
