"""Text transformer: causal masking and pooling at the first end-of-text token."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.text import TextTransformer, eos_positions


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile, most of an init's cost.
    return jax.random.key(seed, impl="rbg")


EOS = 3


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    # Compiled once per module: eager flax compiles op by op, which is slower on a small CPU.
    return _jit_apply(module)(variables, *args, **kwargs)


def _model(**kw):
    return TextTransformer(
        vocab_size=20, context_length=8, width=16, depth=2, heads=2, mlp_dim=32, eos_id=EOS, **kw
    )


def test_eos_positions_first_occurrence_and_fallback():
    tokens = jnp.array([[5, 6, 3, 3, 0], [3, 7, 3, 0, 0], [5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(eos_positions(tokens, EOS), [2, 0, 4])


def test_causal_and_pooled_at_eos():
    model = _model()
    tokens = jnp.array([[5, 6, 7, EOS, 0, 0], [8, EOS, EOS, 1, 2, 0]])
    # Initialised at the full context (8), applied to shorter rows (6).
    variables = jax.jit(model.init)(_key(0), jnp.zeros((1, 8), jnp.int32))
    out = _apply(model, variables, tokens)
    assert out["hidden"].shape == (2, 6, 16) and out["pooled"].shape == (2, 16)
    np.testing.assert_array_equal(out["pooled"][0], out["hidden"][0, 3])
    np.testing.assert_array_equal(out["pooled"][1], out["hidden"][1, 1])
    # Tokens after the eos do not reach it (causal), so padding does not change the features.
    changed = tokens.at[:, 4].set(9)
    out2 = _apply(model, variables, changed)
    np.testing.assert_allclose(out2["hidden"][:, :4], out["hidden"][:, :4], atol=1e-6)
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-6)
    assert not np.allclose(out2["hidden"][:, 4], out["hidden"][:, 4])
