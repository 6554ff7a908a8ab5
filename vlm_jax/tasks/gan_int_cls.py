"""GAN-INT-CLS training (Reed et al. 2016, algorithm 1 and sec. 4.2), as one loss for the trainer.

With h the (frozen) text embedding of each image's caption, h' a mismatched one (the batch's
embeddings rolled by one) and s = sigmoid(D(.)):

    discriminator:  -[log s(x, h) + (log(1 - s(x, h')) + log(1 - s(G(z, h), h))) / 2]
                    (with task.real_label r < 1 the first term is r log s + (1 - r) log(1 - s))
    generator:      -log s(G(z, h), h)  -  int_weight * log s(G(z', h_b), h_b)

with h_b = beta h + (1 - beta) h' (the INT term: the generator also learns on interpolated
embeddings, beta = task.int_beta, 0.5 in the paper) and the non-saturating generator loss.
task.mode_seeking w > 0 (not in the paper) adds w * mean|z - z2| / mean|G(z, h) - G(z2, h)| to the
generator (Mao et al. 2019: a conditional generator that ignores z pays for it).

The two players are one update: the discriminator's term sees the generated images behind
stop_gradient, and the generator's terms see the discriminator's params behind stop_gradient, so
the gradient of the sum gives each player exactly the gradient of its own loss. Each player has
its own optimiser (config.optim.groups: Adam 2e-4, beta1 0.5 in the paper) and both step together
from the same point (simultaneous updates, rather than the paper's discriminator-then-generator
alternation). Batch norm statistics: the generator's from its pass on z, the discriminator's from
its three passes on (real, right text), (real, wrong text), (fake, right text); the generator
loss's passes through the discriminator leave them as they are.

Batches: image f32 [B, S, S, 3] (data-normalised), tokens int32 [B, L] (one caption each).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """The two players' losses summed; metrics d_loss, g_loss, g_int_loss and the mean
    discriminator outputs d_real, d_wrong, d_fake (probabilities)."""
    task = config.task
    images = batch["image"]
    b = images.shape[0]
    rz, rint, rd = jax.random.split(rng, 3)
    h = model.apply({"params": params}, batch["tokens"], method=model.embed_text)
    wrong = jnp.roll(h, 1, axis=0)
    z = jax.random.normal(rz, (b, model.z_dim), jnp.float32)

    fake, state = apply_train(model, params, model_state, z, h, rng=rd, method=model.generate)
    s_real, state = apply_train(model, params, state, images, h, rng=rd, method=model.discriminate)
    s_wrong, state = apply_train(model, params, state, images, wrong, rng=rd, method=model.discriminate)
    s_fake, state = apply_train(
        model, params, state, jax.lax.stop_gradient(fake), h, rng=rd, method=model.discriminate
    )
    # One-sided label smoothing (Salimans et al. 2016; task.real_label < 1, not in the paper): the
    # (real, right text) target is real_label, so the discriminator's logits stay finite.
    real = float(task.get("real_label", 1.0))
    d_real_loss = real * jax.nn.softplus(-s_real) + (1.0 - real) * jax.nn.softplus(s_real)
    d_loss = jnp.mean(d_real_loss + 0.5 * (jax.nn.softplus(s_wrong) + jax.nn.softplus(s_fake)))

    # The generator's view: the discriminator's params fixed, its statistics not updated.
    frozen_d = dict(params, discriminator=jax.lax.stop_gradient(params["discriminator"]))
    g_logits, _ = apply_train(model, frozen_d, state, fake, h, rng=rd, method=model.discriminate)
    g_loss = jnp.mean(jax.nn.softplus(-g_logits))
    beta = float(task.get("int_beta", 0.5))
    h_int = beta * h + (1.0 - beta) * wrong
    z_int = jax.random.normal(rint, (b, model.z_dim), jnp.float32)
    fake_int, _ = apply_train(model, params, state, z_int, h_int, rng=rd, method=model.generate)
    int_logits, _ = apply_train(model, frozen_d, state, fake_int, h_int, rng=rd, method=model.discriminate)
    g_int = jnp.mean(jax.nn.softplus(-int_logits))
    g_total = g_loss + float(task.get("int_weight", 1.0)) * g_int
    ms_weight = float(task.get("mode_seeking", 0.0))
    if ms_weight > 0:
        # Mode seeking (Mao et al. 2019, not in the paper): a second noise for the same captions
        # should give another image; the generator minimises mean|z - z2| / mean|G(z) - G(z2)|.
        z2 = jax.random.normal(jax.random.fold_in(rz, 1), (b, model.z_dim), jnp.float32)
        fake2, _ = apply_train(model, params, state, z2, h, rng=rd, method=model.generate)
        g_ms = jnp.mean(jnp.abs(z - z2)) / (jnp.mean(jnp.abs(fake - fake2)) + 1e-5)
        g_total = g_total + ms_weight * g_ms

    loss = d_loss + g_total
    metrics = dict(
        loss=loss, d_loss=d_loss, g_loss=g_loss, g_int_loss=g_int,
        **({"g_mode_seeking": g_ms} if ms_weight > 0 else {}),
        d_real=jnp.mean(jax.nn.sigmoid(s_real)), d_wrong=jnp.mean(jax.nn.sigmoid(s_wrong)),
        d_fake=jnp.mean(jax.nn.sigmoid(s_fake)),
    )
    return loss, {"metrics": metrics, "model_state": state}


def generate(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, config: Any) -> jax.Array:
    """Images [B, S, S, 3] (data-normalised) for tokens [B, L], z ~ N(0, I) from rng; batch norm
    with its running statistics."""
    del config
    z = jax.random.normal(rng, (tokens.shape[0], model.z_dim), jnp.float32)
    return generate_from(model, variables, tokens, z)


@functools.partial(jax.jit, static_argnums=0)
def generate_from(model: nn.Module, variables: dict, tokens: jax.Array, z: jax.Array) -> jax.Array:
    """Images for tokens [B, L] and given noise z [B, z_dim] (e.g. one z across prompts)."""
    h = model.apply(variables, tokens, method=model.embed_text)
    return model.apply(variables, z, h, method=model.generate)


@functools.partial(jax.jit, static_argnums=0)
def text_embeddings(model: nn.Module, variables: dict, tokens: jax.Array) -> jax.Array:
    """The generator's text embeddings [B, E] of tokens [B, L]."""
    return model.apply(variables, tokens, method=model.embed_text)


@functools.partial(jax.jit, static_argnums=0)
def images_from_embeddings(model: nn.Module, variables: dict, embedding: jax.Array, z: jax.Array) -> jax.Array:
    """Images for text embeddings [B, E] (e.g. interpolated between two prompts) and noise z."""
    return model.apply(variables, z, embedding, method=model.generate)


def interpolate(
    model: nn.Module, variables: dict, tokens_a: jax.Array, tokens_b: jax.Array, betas: Any, num: int,
    rng: jax.Array, config: Any,
) -> jax.Array:
    """Images [num, len(betas), S, S, 3]: row i one noise z_i, column j the text embedding
    (1 - beta_j) h(a) + beta_j h(b) of the two prompts' tokens [L] (the INT term's blend)."""
    del config
    h = text_embeddings(model, variables, jnp.stack([tokens_a, tokens_b]))
    betas = jnp.asarray(betas, jnp.float32)[:, None]
    blends = (1.0 - betas) * h[0] + betas * h[1]  # [S, E]
    z = jax.random.normal(rng, (num, model.z_dim), jnp.float32)
    s = blends.shape[0]
    flat = images_from_embeddings(model, variables, jnp.tile(blends, (num, 1)), jnp.repeat(z, s, axis=0))
    return flat.reshape((num, s) + flat.shape[1:])
