"""The char-CNN-RNN text tower (Reed et al. 2016): character tokenizer, shapes, padding never
reaching the embedding, and its place as a CLIP / GAN-INT-CLS text tower chosen by config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.models import char_cnn_rnn


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    texts = ["a red circle.", "a large blue square on the left.", "the large shape is a green ring."] * 50
    return Tokenizer.train(texts, tmp_path_factory.mktemp("tok") / "chars", 64, model_type="char")


def test_a_character_tokenizer_gives_one_id_per_character(chars, tmp_path):
    for text in ("a red circle.", "a blue ring"):
        ids = chars.encode(text)
        assert len(ids) == len(text) + 1  # sentencepiece's leading word boundary, then one per character
        assert chars.decode(ids) == text
    with pytest.raises(ValueError, match="model_type 'word'"):
        Tokenizer.train(["a b"], tmp_path / "x", 16, model_type="word")


def test_padding_never_reaches_the_embedding(chars):
    model = char_cnn_rnn.CharCnnRnn(vocab_size=64, channels=(16, 16), hidden=16, width=8)
    rows = chars.tokenize(["a red circle.", "a large blue square on the left."], 40)
    tokens = jnp.asarray(rows)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    out = jax.jit(model.apply)(params, tokens)
    assert out["pooled"].shape == (2, 8) and out["hidden"].shape == (2, 5, 16)  # 40 -> 14 -> 5 steps
    # The same captions padded to 61 characters: the same embeddings.
    longer = jnp.pad(tokens, ((0, 0), (0, 21)))
    np.testing.assert_allclose(jax.jit(model.apply)(params, longer)["pooled"], out["pooled"], atol=1e-6)
    # A changed character changes it; a row's embedding does not depend on the other rows.
    changed = tokens.at[0, 4].set(tokens[0, 5])
    assert float(jnp.abs(model.apply(params, changed)["pooled"][0] - out["pooled"][0]).max()) > 1e-4
    np.testing.assert_allclose(model.apply(params, tokens[1:])["pooled"][0], out["pooled"][1], atol=1e-6)
    with pytest.raises(ValueError, match=r"tokens must be \[B, L\]"):
        model.apply(params, tokens[0])


def test_clip_and_the_gan_take_it_as_their_text_tower():
    clip = config_lib.load("configs/clip.py:tiny_char")
    assert clip.tokenizer.model_type == "char" and clip.data.text_length == 80
    model = models.build(clip)
    images = jnp.zeros((2, 32, 32, 3))
    tokens = jnp.ones((2, 80), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    assert set(shapes["text"]) == {"conv_0", "conv_0_bias", "conv_1", "conv_1_bias", "lstm", "out"}
    gan = config_lib.load("configs/gan_int_cls.py:tiny_char")
    assert gan.stages.clip.config.endswith("clip.py:tiny_char") and gan.tokenizer.model_type == "char"
    gan_shapes = jax.eval_shape(models.build(gan).init, jax.random.key(0), images, tokens)["params"]
    # The GAN stage loads these by train.init_from_map "text:text,...": the same tree.
    assert jax.tree.map(lambda x: x.shape, gan_shapes["text"]) == jax.tree.map(lambda x: x.shape, shapes["text"])
    bad = config_lib.load("configs/clip.py:tiny_char", {"model.text.kind": "bag"})
    with pytest.raises(ValueError, match="model.text.kind 'bag'"):
        models.build(bad)
