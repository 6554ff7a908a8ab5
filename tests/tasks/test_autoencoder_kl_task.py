"""tasks.autoencoder_kl (latent diffusion's first stage): the loss's two parts, the KL weight's
effect, the metrics, and the `reconstruction` evaluator on a continuous autoencoder (decode of the
posterior mean; no codebook statistics)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from vlm_jax import config as config_lib
from vlm_jax import evals, models
from vlm_jax.data import pipeline, world
from vlm_jax.data.normalise import normalise
from vlm_jax.evals import reconstruction
from vlm_jax.models import autoencoder_kl
from vlm_jax.tasks import autoencoder_kl as task

_SMALL = {"model.block_out_channels": (8, 16, 16), "model.norm_num_groups": 4}


def _config(**task_overrides):
    cfg = config_lib.load("configs/ldm.py:autoencoder_tiny", _SMALL)
    with cfg.unlocked():
        cfg.task.update(task_overrides)
    return cfg


@functools.cache
def _setup():
    cfg = _config()
    model = models.build(cfg)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(4, 16, 16, 3)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]

    @functools.partial(jax.jit, static_argnums=0)
    def loss(task_items, params):
        return task.loss_fn(model, params, {"image": images}, jax.random.key(1), _config(**dict(task_items)), {})

    return model, images, params, loss


def test_loss_is_the_reconstruction_of_the_sample_plus_the_weighted_kl():
    model, images, params, loss = _setup()

    @jax.jit
    def run(p):  # one program: the three share their forward pass
        # The loss's forward pass: training mode, the sample drawn from the loss's rng.
        out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(1)})
        return loss((("kl_weight", 1e-3),), p), loss((("kl_weight", 1e-3), ("recon_loss", "l1")), p)[1], out

    (total, aux), l1, out = run(params)
    m = aux["metrics"]
    assert set(m) == {"loss", "recon_loss", "kl", "kl_term", "latent_std", "posterior_std"}
    assert aux["model_state"] == {}
    assert not np.allclose(out["z"], out["mean"])  # the reparameterised sample, not the mean
    np.testing.assert_allclose(m["recon_loss"], np.mean(np.square(out["reconstruction"] - images)), rtol=1e-5)
    kl = np.asarray(autoencoder_kl.kl(out["mean"], out["logvar"]))
    np.testing.assert_allclose(m["kl_term"], 1e-3 * kl.mean() / (16 * 16 * 3), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl.mean() / (4 * 4 * 4), rtol=1e-5)  # nats per latent entry
    np.testing.assert_allclose(total, m["recon_loss"] + m["kl_term"], rtol=1e-6)
    np.testing.assert_allclose(m["latent_std"], np.std(out["mean"]), rtol=1e-5)
    np.testing.assert_allclose(m["posterior_std"], np.exp(0.5 * out["logvar"]).mean(), rtol=1e-5)
    np.testing.assert_allclose(l1["metrics"]["recon_loss"], np.mean(np.abs(out["reconstruction"] - images)), rtol=1e-5)
    assert task.kl_per_value(jnp.asarray([6.0, 12.0]), (2, 2, 3)) == pytest.approx(9.0 / 12)


def test_kl_weight_scales_the_kl_term_and_pulls_the_encoder_only():
    model, images, params, loss = _setup()

    def added(p):  # what a KL weight of 1 adds to the loss of weight 0 (same rng, same sample)
        (l0, a0), (l1, a1) = (loss((("kl_weight", w),), p) for w in (0.0, 1.0))
        return l1 - l0, (a0["metrics"], a1["metrics"])

    (_, (m0, m1)), grads = jax.jit(jax.value_and_grad(added, has_aux=True))(params)
    assert float(m0["kl_term"]) == 0.0 and float(m0["loss"]) == float(m0["recon_loss"])
    np.testing.assert_allclose(m1["kl"], m0["kl"], rtol=1e-6)
    np.testing.assert_allclose(m1["kl_term"], m1["kl"] * (4 * 4 * 4) / (16 * 16 * 3), rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m1["recon_loss"] + m1["kl_term"], rtol=1e-6)
    # The KL moves the encoder (and quant_conv) towards the prior and leaves the decoder alone.
    norm = lambda tree: float(optax.global_norm(tree))  # noqa: E731
    assert norm(grads["encoder"]) > 0 and norm(grads["quant_conv"]) > 0
    assert norm(grads["decoder"]) < 1e-6 * norm(grads["encoder"]) and norm(grads["post_quant_conv"]) < 1e-9
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        loss((("kl_weight", -1.0),), params)


def _world_eval_data(config, split, num_examples, tokenizer, **kw):
    examples = [world.example(i, split, image_size=32) for i in range(int(num_examples))]
    return {"image": normalise(np.stack([ex["image"] for ex in examples]), config),
            "objects": [ex["objects"] for ex in examples]}


def test_the_reconstruction_evaluator_decodes_the_posterior_mean(monkeypatch):
    monkeypatch.setattr(pipeline, "eval_data", _world_eval_data)
    model, _, params, _ = _setup()  # (conv and attention params fit any image size)
    cfg = _config()
    with cfg.unlocked():
        cfg.evals.val.update(dict(num_examples=6, batch_size=4, num_png=4))
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    (ev,) = evals.build(cfg, model, None, mesh)
    assert isinstance(ev, reconstruction.ReconstructionEvaluator) and ev.num_codes is None
    codes, recon = ev.reconstruct(params)
    assert codes is None and recon.shape == (6, 32, 32, 3)
    # The model's evaluation-mode forward pass decodes the mean too.
    np.testing.assert_allclose(recon, jax.jit(model.apply)({"params": params}, ev.data["image"])["reconstruction"],
                               rtol=1e-4, atol=1e-5)
    out = ev(params)
    assert "val/recon/perplexity" not in out and "val/recon/dead_codes" not in out
    assert {"val/recon/mse", "val/recon/color_acc", "val/recon/shape_acc", "val/recon/size_acc",
            "val/recon/position_acc", "val/recon/main_acc", "val/recon/all_acc"} <= set(out)
    assert math.isfinite(out["val/recon/mse"]) and ev.last_reconstructions.dtype == np.uint8
    with pytest.raises(ValueError, match="autoencoder with reconstruct"):
        reconstruction.ReconstructionEvaluator("val", cfg.evals.val, cfg, object(), None, mesh)
