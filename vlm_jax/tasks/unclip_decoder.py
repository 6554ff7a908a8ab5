"""Training and sampling the unCLIP decoder (models.unclip_decoder; Ramesh et al. 2022).

    config.task = dict(name="unclip_decoder", <tasks.diffusion's schedule, prediction, min_snr_gamma
                       and sampler keys>, cond_drop=0.5, embed_drop=0.1, guidance=3.0,
                       prior=<the prior stage's task section: its sampler, steps, guidance, best_of>)

Loss: tasks.diffusion's simple loss on the decoder's low-resolution images, conditioned on the true
image's CLIP embedding and the caption; the caption is replaced by the empty one with probability
cond_drop (the paper's 50%) and the embedding zeroed with probability embed_drop (10%),
independently, so that guidance has an unconditional model (empty caption, zero embedding).

Drawing:
* `generate` (the `generation` evaluator, `vlm-jax sample`): the prior samples a CLIP image
  embedding per caption (tasks.diffusion_prior.sample_embeddings with config.task.prior), then
  `draw` decodes it;
* `draw(model, variables, tokens, image_embed, rng, config)`: decoder samples for given embeddings
  (guided: out_u + w (out_c - out_u), the unconditional input the empty caption with a zero
  embedding) by tasks.diffusion's samplers, one compiled loop;
* `variations`: an image's own CLIP embedding drawn n times with the empty caption (the paper's
  image variations); `interpolate_images`: decodes the spherical interpolation between two images'
  embeddings at the given fractions, from the same starting noise (the paper's figure 4). The
  upsamplers' tasks raise both to their resolution (tasks.diffusion_upsample.variations, ...).

Batches: image f32 [B, S, S, 3] (data-normalised), tokens int32 [B, L].
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.tasks import diffusion, diffusion_prior


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def loss_fn(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
    config: ml_collections.ConfigDict, model_state: dict,
) -> tuple[jax.Array, dict]:
    """The decoder's diffusion loss at one random timestep per example (module docstring)."""
    task = config.task
    images, tokens = batch["image"], batch["tokens"]
    b = tokens.shape[0]
    r_caption, r_embed = jax.random.split(diffusion.condition_key(rng))
    variables = {"params": params, **model_state}
    embed = model.apply(variables, images, method=model.embed_image)
    caption_drop, embed_drop = float(task.get("cond_drop", 0.5)), float(task.get("embed_drop", 0.1))
    dropped_caption = jax.random.bernoulli(r_caption, caption_drop, (b, 1))
    dropped_embed = jax.random.bernoulli(r_embed, embed_drop, (b, 1))
    tokens = jnp.where(dropped_caption, diffusion.empty_tokens(tokens), tokens)
    embed = jnp.where(dropped_embed, 0.0, embed)
    x0 = model.apply(variables, images, method=model.encode)
    cond = model.apply(variables, tokens, embed, method=model.condition)
    loss, metrics, state = diffusion.denoising_loss(model, params, model_state, x0, cond, rng, task)
    metrics.update(caption_dropped=dropped_caption.mean(), embed_dropped=dropped_embed.mean())
    return loss, {"metrics": metrics, "model_state": state}


def subtree(variables: dict, name: str) -> dict:
    """A submodule's variables: each collection's `name` entry (collections without one left out)."""
    return {coll: tree[name] for coll, tree in variables.items() if name in tree}


@functools.partial(jax.jit, static_argnums=0)
def _condition(model: nn.Module, variables: dict, tokens: jax.Array, embed: jax.Array) -> dict:
    return model.apply(variables, tokens, embed, method=model.condition)


@functools.partial(jax.jit, static_argnums=0)
def _embed_images(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, method=model.embed_image)


def output_size(config: Any) -> int:
    """The side of the decoder's images: data.image_size / model.downsample (sampling.draw reads it)."""
    return int(config.data.image_size) // int(config.model.get("downsample", 1))


def sample_shape(model: nn.Module, config: Any, batch: int) -> tuple[int, int, int, int]:
    """The decoder's output shape: [B, S / downsample, S / downsample, 3]."""
    size = int(config.data.image_size) // model.downsample
    return (batch, size, size, 3)


def draw(
    model: nn.Module, variables: dict, tokens: jax.Array, image_embed: jax.Array, rng: jax.Array, config: Any,
    *, x_init: jax.Array | None = None,
) -> jax.Array:
    """Decoder images [B, s, s, 3] for captions tokens [B, L] and CLIP image embeddings [B, E]."""
    tokens, image_embed = jnp.asarray(tokens), jnp.asarray(image_embed, jnp.float32)
    if image_embed.shape[0] != tokens.shape[0]:
        raise ValueError(f"unclip_decoder: {image_embed.shape[0]} embeddings for {tokens.shape[0]} captions")
    cond = _condition(model, variables, tokens, image_embed)
    null = lambda: _condition(  # noqa: E731
        model, variables, diffusion.empty_tokens(tokens[:1]), jnp.zeros_like(image_embed[:1]))
    shape = sample_shape(model, config, tokens.shape[0])
    return diffusion.sample_conditioned(model, variables, cond, null, shape, rng, config.task, x_init=x_init)


def prior_task(config: Any) -> ml_collections.ConfigDict:
    """The prior's sampling settings (config.task.prior); a clear error without them."""
    prior = config.task.get("prior")
    if not prior:
        raise ValueError("unclip_decoder: config.task.prior (the prior stage's task section) is missing")
    return prior


def generate(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, config: Any) -> jax.Array:
    """Images [B, s, s, 3] for captions [B, L]: prior sample, then the decoder (module docstring)."""
    r_prior, r_draw = jax.random.split(rng)
    embed = diffusion_prior.sample_embeddings(model.prior, subtree(variables, "prior"), jnp.asarray(tokens),
                                              r_prior, prior_task(config))
    return draw(model, variables, tokens, embed, r_draw, config)


def prepare_image(image: Any, config: Any) -> jax.Array:
    """An image (uint8 [H, W, 3], any size: centre-cropped and resized as the data pipeline does;
    or already data-normalised float [S, S, 3]) -> the data-normalised float32 [S, S, 3] at
    data.image_size that CLIP reads."""
    from vlm_jax.data.pipeline import preprocess_images

    image = np.asarray(image)
    size = int(config.data.image_size)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"unclip_decoder: an image must be [H, W, 3], got {image.shape}")
    if image.dtype != np.uint8:
        if image.shape[:2] != (size, size):
            raise ValueError(f"unclip_decoder: a float image must already be {size}x{size}, got {image.shape[:2]}")
        return jnp.asarray(image, jnp.float32)
    return jnp.asarray(preprocess_images(image[None], config)[0], jnp.float32)


def variations(model: nn.Module, variables: dict, image: Any, num: int, rng: jax.Array, config: Any) -> jax.Array:
    """`num` images [num, s, s, 3] drawn from one image's CLIP embedding with the empty caption (the
    paper's variations); image as prepare_image takes it."""
    embed = _embed_images(model, variables, prepare_image(image, config)[None])
    tokens = jnp.zeros((int(num), int(config.data.text_length)), jnp.int32)
    return draw(model, variables, tokens, jnp.repeat(embed, int(num), axis=0), rng, config)


def slerp(a: jax.Array, b: jax.Array, fractions: jax.Array) -> jax.Array:
    """Spherical interpolation between vectors a, b [E] at fractions [N] -> [N, E]; the norm
    interpolates linearly (equal norms, as CLIP's scaled embeddings have, stay equal)."""
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    ua, ub = a / na, b / nb
    omega = jnp.arccos(jnp.clip(jnp.dot(ua, ub), -1.0, 1.0))
    f = jnp.asarray(fractions, jnp.float32)[:, None]
    small = omega < 1e-4  # nearly parallel: linear interpolation is exact enough and stable
    so = jnp.where(small, 1.0, jnp.sin(omega))
    wa = jnp.where(small, 1.0 - f, jnp.sin((1.0 - f) * omega) / so)
    wb = jnp.where(small, f, jnp.sin(f * omega) / so)
    return (wa * ua + wb * ub) * ((1.0 - f) * na + f * nb)


def interpolate_images(
    model: nn.Module, variables: dict, image_a: Any, image_b: Any, fractions: Any, rng: jax.Array, config: Any,
) -> jax.Array:
    """Images [N, s, s, 3] from the slerp of two images' CLIP embeddings at fractions [N], all from
    the same starting noise (so only the embedding changes along the row); images as
    prepare_image takes them."""
    pair = jnp.stack([prepare_image(image_a, config), prepare_image(image_b, config)])
    embeds = _embed_images(model, variables, pair)
    fractions = np.asarray(fractions, np.float32)
    path = slerp(embeds[0], embeds[1], jnp.asarray(fractions))
    n = len(fractions)
    shape = sample_shape(model, config, n)
    x_init = jnp.broadcast_to(jax.random.normal(jax.random.fold_in(rng, 1), shape[1:]), shape)
    tokens = jnp.zeros((n, int(config.data.text_length)), jnp.int32)
    return draw(model, variables, tokens, path, rng, config, x_init=x_init)
