"""Optimiser: decay mask, schedule, clipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax.config_defaults import base_config
from vlm_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer


def _params():
    return {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
        "ln": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
        "embed": {"embedding": jnp.ones((10, 4))},
        "logit_scale": jnp.ones(()),
        "pos_embedding": jnp.ones((5, 4)),
        # Stacked by nn.scan: biases become 2-D, still not decayed.
        "layers": {"mlp": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}},
    }


def test_decay_mask_skips_biases_norms_and_temperature():
    mask = decay_mask(_params())
    assert mask["dense"]["kernel"] and mask["embed"]["embedding"] and mask["layers"]["mlp"]["kernel"]
    assert not any([mask["dense"]["bias"], mask["ln"]["scale"], mask["ln"]["bias"]])
    assert not mask["logit_scale"] and not mask["pos_embedding"] and not mask["layers"]["mlp"]["bias"]


def test_decay_mask_sees_through_partitioned_boxes():
    boxed = {"kernel": nn.Partitioned(jnp.ones((2, 2)), names=("embed", "mlp")), "bias": jnp.ones(2)}
    mask = nn.meta.unbox(decay_mask(boxed))
    assert mask == {"kernel": True, "bias": False}


def test_weight_decay_only_touches_kernels():
    cfg = base_config().optim
    cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.schedule, cfg.clip_norm = 0.1, 0.5, 0, "constant", 0.0
    tx = make_optimizer(cfg, 10)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["logit_scale"])) == 0


def test_warmup_then_cosine():
    cfg = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0))
    s = learning_rate_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-6)


def test_clipping_bounds_the_update():
    cfg = base_config().optim
    cfg.name, cfg.lr, cfg.b1, cfg.weight_decay, cfg.warmup_steps, cfg.schedule, cfg.clip_norm = (
        "sgd", 1.0, 0.0, 0.0, 0, "constant", 1.0)
    tx = make_optimizer(cfg, 10)
    params = {"kernel": jnp.zeros((4,))}
    updates, _ = tx.update({"kernel": jnp.full((4,), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(float(jnp.linalg.norm(updates["kernel"])), 1.0, rtol=1e-5)


def _grouped(**groups):
    cfg = base_config().optim
    with cfg.unlocked():
        cfg.warmup_steps, cfg.schedule, cfg.weight_decay, cfg.clip_norm = 0, "constant", 0.0, 0.0
        cfg.groups = ml_collections.ConfigDict(groups)
    return cfg


def test_groups_are_optimisers_of_their_own():
    """Each group its own Adam (lr, b1) and state; the rest with config.optim; frozen stay put."""
    params = {"generator": {"kernel": jnp.ones((2,))}, "discriminator": {"kernel": jnp.ones((2,))},
              "text": {"kernel": jnp.ones((2,))}}
    cfg = _grouped(generator=dict(pattern="^generator/", lr=0.1, b1=0.5),
                   discriminator=dict(pattern="^discriminator/", lr=0.01))
    frozen = lambda p: {k: jax.tree.map(lambda _: k != "text", v) for k, v in p.items()}  # noqa: E731
    tx = make_optimizer(cfg, 10, frozen)
    state = tx.init(params)
    assert set(state.inner_states) == {"generator", "discriminator", "train", "frozen"}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    # Adam's first step moves every param by its lr (sign of the gradient).
    np.testing.assert_allclose(updates["generator"]["kernel"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["discriminator"]["kernel"], -0.01, rtol=1e-5)
    np.testing.assert_allclose(updates["text"]["kernel"], 0.0)
    # The same step through one optimiser with the base lr for a param no group names.
    cfg = _grouped(generator=dict(pattern="^generator/", lr=0.1))
    updates, _ = make_optimizer(cfg, 10).update(grads, make_optimizer(cfg, 10).init(params), params)
    np.testing.assert_allclose(updates["text"]["kernel"], -cfg.lr, rtol=1e-5)


def test_bad_groups_are_clear_errors():
    with pytest.raises(ValueError, match="give a 'pattern'"):
        make_optimizer(_grouped(generator=dict(lr=0.1)), 10)
    with pytest.raises(ValueError, match=r"unknown optimiser keys \['lrr'\]"):
        make_optimizer(_grouped(generator=dict(pattern="g", lrr=0.1)), 10)
