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

    def ce(z):
        z = z - z.max(1, keepdims=True)
        return -np.mean(np.diag(z) - np.log(np.exp(z).sum(1)))

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


def test_hard_negatives_join_only_the_image_to_text_softmax():
    rng = np.random.default_rng(2)
    img, txt, neg = (_unit(rng.normal(size=(5, 4))) for _ in range(3))
    scale = 6.0

    def ce(logits):
        logits = logits - logits.max(1, keepdims=True)
        return -np.mean(logits[np.arange(5), np.arange(5)] - np.log(np.exp(logits).sum(1)))

    pos = scale * img @ txt.T
    want = 0.5 * (ce(np.concatenate([pos, scale * img @ neg.T], 1)) + ce(pos.T))
    got = softmax_loss(jnp.asarray(img), jnp.asarray(txt), scale, jnp.asarray(neg))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # A negative that reads like the truth makes the loss larger than an unrelated one.
    close = softmax_loss(jnp.asarray(img), jnp.asarray(txt), scale, jnp.asarray(_unit(txt + 0.05 * neg)))
    assert float(close) > float(got)

    logits = 10.0 * img @ np.concatenate([txt, neg]).T - 10.0
    signs = -np.ones((5, 10))
    signs[np.arange(5), np.arange(5)] = 1
    want = -np.sum(np.log(1 / (1 + np.exp(-signs * logits)))) / 5
    got = sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -10.0, jnp.asarray(neg))
    assert float(got) == pytest.approx(want, rel=1e-5)
