"""The unCLIP decoder: its two image-embedding paths, the loss's drops and frozen prior, drawing from
the prior's samples in one compiled loop, variations and interpolation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax import models, tasks
from vlm_jax.sampling import diffusion as samplers

DECODER = tasks.get("unclip_decoder")
E = 16  # the CLIP embedding width


def _config(image_tokens: int = 2) -> ml_collections.ConfigDict:
    clip = config_lib.load("configs/clip.py:tiny", {
        "model.embed_dim": E, "model.text.width": 16, "model.text.depth": 1, "model.text.heads": 2,
        "model.image.channels": (8, 16, 16), "model.image.pool": "mean",
    }).model.to_dict()
    unet = dict(
        name="unet", in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="", attention_head_dim=2, cross_attention_dim=16, use_linear_projection=True,
        norm_num_groups=4, pooled_dim=E,
    )
    prior = dict(name="unclip_prior", clip=clip, width=16, depth=1, heads=2, mlp_ratio=2.0)
    return ml_collections.ConfigDict(dict(
        model=dict(name="unclip_decoder", prior=prior, unet=unet, image_tokens=image_tokens, downsample=2),
        task=dict(name="unclip_decoder", schedule="cosine", num_train_steps=100, prediction="epsilon",
                  cond_drop=0.5, embed_drop=0.1, sampler="ddim", sample_steps=3, guidance=2.0, clip_sample=1.0,
                  prior=dict(name="diffusion_prior", schedule="cosine", num_train_steps=100, sampler="ddim",
                             sample_steps=2, guidance=1.0, best_of=2)),
        data=dict(image_size=32, text_length=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ))


@pytest.fixture(scope="module")
def tiny():
    """A narrow decoder (its prior and CLIP included), initialised once for the tests below."""
    config = _config()
    model = models.build(config)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    tokens = jnp.array([[2, 5, 6, 3] + [0] * 16, [2, 7, 3] + [0] * 17], jnp.int32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens))
    return config, model, variables, images, tokens


def test_shapes_and_both_paths_of_the_image_embedding(tiny):
    config, model, variables, images, tokens = tiny
    assert {"prior", "unet", "image_tokens"} <= set(variables["params"])
    assert "clip" in variables["params"]["prior"]
    embed = model.apply(variables, images, method=model.embed_image)
    assert embed.shape == (2, E)
    np.testing.assert_allclose(np.linalg.norm(embed, axis=-1), np.sqrt(E), rtol=1e-5)  # scaled unit CLIP
    cond = model.apply(variables, tokens, embed, method=model.condition)
    assert cond["context"].shape == (2, 20 + 2, 16) and cond["pooled"].shape == (2, E)
    x = model.apply(variables, images, method=model.encode)
    assert x.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(x[0, 0, 0], images[0, :2, :2].mean(axis=(0, 1)), atol=1e-6)  # 2x2 means
    t = jnp.array([5, 50])

    @jax.jit
    def out(pooled, tokens_from):  # the UNet's output with e = pooled in the time embedding, the
        c = model.apply(variables, tokens, tokens_from, method=model.condition)  # extra tokens of another
        return model.apply(variables, x, t, c["context"], pooled, method=model.denoise)

    other, zero = embed[::-1], jnp.zeros_like(embed)
    assert np.abs(np.asarray(out(other, other) - out(embed, embed))).max() > 1e-4
    assert np.abs(np.asarray(out(other, zero) - out(embed, zero))).max() > 1e-4  # through pooled alone
    assert np.abs(np.asarray(out(zero, other) - out(zero, embed))).max() > 1e-4  # through the tokens alone
    with_zero = model.apply(variables, tokens, zero, method=model.condition)["context"]
    np.testing.assert_array_equal(cond["context"][:, :20], with_zero[:, :20])  # the caption's part


def test_without_image_tokens_the_context_is_the_caption_and_bad_settings_are_errors():
    config = _config(image_tokens=0)
    model = models.build(config)
    images = jnp.zeros((1, 32, 32, 3))
    tokens = jnp.array([[2, 5, 3] + [0] * 17], jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    assert "image_tokens" not in variables["params"]
    odd = models.build(ml_collections.ConfigDict({**config.model.to_dict(), "downsample": 3}))
    with pytest.raises(ValueError, match="factor 3 does not divide"):
        odd.apply({}, jnp.zeros((1, 32, 32, 3)), method=odd.encode)
    with pytest.raises(ValueError, match="model.prior is missing"):
        models.build(ml_collections.ConfigDict(dict(name="unclip_decoder", unet=config.model.unet.to_dict())))


def test_loss_drops_captions_and_embeddings_and_leaves_the_prior_frozen(tiny):
    """Everything dropped (one compiled gradient, two batches): the loss is the unconditional
    model's whatever the captions say, and only the decoder's own params learn."""
    config, model, variables, images, tokens = tiny
    params = variables["params"]
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.task.update(dict(cond_drop=1.0, embed_drop=1.0))
    grad = jax.jit(jax.grad(lambda p, b: DECODER.loss_fn(model, p, b, jax.random.key(3), cfg, {}), has_aux=True))
    grads, aux = grad(params, dict(image=images, tokens=tokens))
    norm = lambda tree: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))  # noqa: E731
    assert norm(grads["prior"]) == 0.0  # CLIP and the prior get nothing
    assert norm(grads["unet"]) > 0 and norm(grads["image_tokens"]["bias"]) > 0
    metrics = aux["metrics"]
    assert (float(metrics["caption_dropped"]), float(metrics["embed_dropped"])) == (1.0, 1.0)
    _, other = grad(params, dict(image=images, tokens=tokens[::-1]))
    assert float(other["metrics"]["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    assert {"loss", "mse", "mse_low_t", "mse_high_t"} <= set(metrics)


def test_generate_draws_from_the_prior_then_the_decoder_in_one_compiled_loop(tiny):
    config, model, variables, images, tokens = tiny
    first = DECODER.generate(model, variables, tokens, jax.random.key(0), config)
    assert first.shape == (2, 16, 16, 3)
    compiled = samplers._loop._cache_size()
    again = DECODER.generate(model, variables, tokens[::-1], jax.random.key(0), config)
    assert samplers._loop._cache_size() == compiled  # new prompts: no new compilation
    assert np.abs(np.asarray(again) - np.asarray(first)).max() > 1e-4
    np.testing.assert_array_equal(DECODER.generate(model, variables, tokens, jax.random.key(0), config), first)
    embed = model.apply(variables, images, method=model.embed_image)
    drawn = DECODER.draw(model, variables, tokens, embed, jax.random.key(0), config)
    assert drawn.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(drawn)).all()
    with pytest.raises(ValueError, match="1 embeddings for 2 captions"):
        DECODER.draw(model, variables, tokens, embed[:1], jax.random.key(0), config)
    bad = ml_collections.ConfigDict(config.to_dict())
    del bad.task["prior"]
    with pytest.raises(ValueError, match="config.task.prior"):
        DECODER.generate(model, variables, tokens, jax.random.key(0), bad)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.task.guidance = -1.0
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        DECODER.draw(model, variables, tokens, embed, jax.random.key(0), bad)


def test_variations_and_interpolation(tiny):
    config, model, variables, images, _ = tiny
    var = DECODER.variations(model, variables, images[0], 3, jax.random.key(0), config)
    assert var.shape == (3, 16, 16, 3)
    assert np.abs(np.asarray(var[0] - var[1])).max() > 1e-4  # different noise per variation
    a, b = jnp.ones(E) * 2.0, jnp.zeros(E).at[0].set(jnp.sqrt(4.0 * E))
    path = DECODER.slerp(a, b, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(path[0], a, atol=1e-5)
    np.testing.assert_allclose(path[2], b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(path, axis=-1), np.sqrt(4.0 * E), rtol=1e-5)  # equal norms kept
    cos = lambda u, v: float(jnp.dot(u, v) / jnp.linalg.norm(u) / jnp.linalg.norm(v))  # noqa: E731
    assert cos(path[1], a) == pytest.approx(cos(path[1], b), abs=1e-5)  # halfway along the arc
    np.testing.assert_allclose(DECODER.slerp(a, a, jnp.array([0.3])), a[None], atol=1e-5)  # parallel: stable
    # uint8 images of another size are resized and normalised as the data pipeline does.
    pixels = np.asarray(jax.random.randint(jax.random.key(5), (2, 48, 48, 3), 0, 256), np.uint8)
    row = DECODER.interpolate_images(model, variables, pixels[0], pixels[1], [0.0, 0.5, 1.0], jax.random.key(0),
                                     config)
    assert row.shape == (3, 16, 16, 3)
    back = DECODER.interpolate_images(model, variables, pixels[0], pixels[1], [1.0, 0.5, 0.0], jax.random.key(0),
                                      config)
    np.testing.assert_allclose(back[::-1], row, atol=1e-5)  # the same start noise in every column
    assert np.abs(np.asarray(row[0] - row[2])).max() > 1e-4  # the embedding moves the image
    with pytest.raises(ValueError, match="must be \\[H, W, 3\\]"):
        DECODER.prepare_image(np.zeros((8, 8), np.uint8), config)
