"""Contrastive losses against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.tasks.contrastive import sigmoid_loss, softmax_loss


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_softmax_loss_matches_numpy():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
    scale = 7.0
    logits = scale * img @ txt.T

    def ce(l):
        l = l - l.max(1, keepdims=True)
        return -np.mean(np.diag(l) - np.log(np.exp(l).sum(1)))

    want = 0.5 * (ce(logits) + ce(logits.T))
    got = softmax_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_sigmoid_loss_matches_numpy():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng.normal(size=(4, 3))), _unit(rng.normal(size=(4, 3)))
    logits = 10.0 * img @ txt.T - 10.0
    labels = 2 * np.eye(4) - 1
    want = -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / 4
    got = sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -10.0)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_perfect_alignment_has_low_loss():
    e = jnp.eye(8)
    assert float(softmax_loss(e, e, 100.0)) < 1e-6
    assert float(softmax_loss(e, jnp.roll(e, 1, axis=0), 100.0)) > 10
    assert jax.grad(lambda s: softmax_loss(e, e, s))(1.0) < 0
