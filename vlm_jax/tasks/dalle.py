"""DALL-E's transformer stage (Ramesh et al. 2021, sec. 2.2): next-token cross-entropy over the
stream [text; image tokens] of models.dalle, the image tokens from the frozen tokenizer.

    config.task = dict(name="dalle", text_loss_weight=1 / 8, text_drop=0.0, word_drop=0.0, temperature=1.0,
                       top_k=0, top_p=1.0, guidance=0.0, guidance_floor=0.0)

Loss: text_loss_weight * CE(text) + (1 - text_loss_weight) * CE(image) (the paper's 1/8 and 7/8),
each the mean over its predicted positions: the text tokens after the first (every position,
per-position pads included, over the text and pad ids) and every image token (over the image codes
only). Metrics: loss, text_loss, image_loss (nats per token), image_acc (top-1 of the image codes)
and image_perplexity. text_drop: the fraction of captions replaced by the empty text (every text
position its pad id), which classifier-free guidance needs (not in the paper). word_drop: of the
captions kept, each word piece (not the first token, bos, nor the last, eos) is replaced by its
position's pad with this probability (not in the paper), so that each word must carry its own
meaning: "circle" alone must still draw a circle, of any colour.

Drawing (`generate`, what the `generation` evaluator and `vlm-jax sample` call): the caption's text
stream is the prompt; grid**2 image codes are sampled through vlm_jax.sampling with the model's
decoder (its logits are the image codes', so temperature / top_k / top_p from config.task act over
image tokens only), then decoded by the tokenizer. guidance s > 0 samples with classifier-free
guidance (models.dalle_decoder.DalleDecoder) from a model trained with text_drop > 0, guidance_floor its
plausibility constraint. Best-of-N reranking by a world CLIP is the
evaluator's (`gen/rerank/...`) and `vlm-jax sample`'s.

Batches: image f32 [B, S, S, 3] (data-normalised), tokens int32 [B, L] (L <= model.text_len).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.tasks.base import apply_train


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs for init: images [B, S, S, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def stream_losses(logits: jax.Array, ids: jax.Array, text_len: int, image_offset: int) -> dict[str, jax.Array]:
    """Per-part cross-entropies of a stream: logits f32 [B, N, V] at positions 0..N-1, ids [B, N].

    Position p predicts ids[p + 1]: text targets ids[1:text_len] over the ids below image_offset,
    image targets ids[text_len:] over the ids from image_offset. -> text_loss, image_loss (mean
    nats per token) and image_acc (top-1)."""
    text_logits = logits[:, : text_len - 1, :image_offset]
    text_targets = ids[:, 1:text_len]
    image_logits = logits[:, text_len - 1 : -1, image_offset:]
    image_targets = ids[:, text_len:] - image_offset

    def ce(lg, targets):
        logp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    return dict(
        text_loss=ce(text_logits, text_targets),
        image_loss=ce(image_logits, image_targets),
        image_acc=jnp.mean((jnp.argmax(image_logits, axis=-1) == image_targets).astype(jnp.float32)),
    )


def drop_words(tokens: jax.Array, rng: jax.Array, rate: float, pad_id: int) -> jax.Array:
    """tokens int [B, L] -> the same with each inner piece (a non-pad token that is neither a row's
    first nor its last non-pad one) replaced by pad_id with probability `rate`."""
    real = tokens != pad_id
    last = real & ~jnp.concatenate([real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1)
    inner = real & ~last & (jnp.arange(tokens.shape[1]) > 0)[None]
    hit = inner & jax.random.bernoulli(rng, rate, tokens.shape)
    return jnp.where(hit, jnp.asarray(pad_id, tokens.dtype), tokens)


def loss_fn(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
    config: ml_collections.ConfigDict, model_state: dict,
) -> tuple[jax.Array, dict]:
    """The weighted stream cross-entropy and its metrics (module docstring)."""
    tokens = batch["tokens"]
    drop = float(config.task.get("text_drop", 0.0))
    if drop > 0:
        rng, drop_rng = jax.random.split(rng)
        dropped = jax.random.bernoulli(drop_rng, drop, (tokens.shape[0], 1))
        tokens = jnp.where(dropped, jnp.asarray(model.pad_id, tokens.dtype), tokens)
    word_drop = float(config.task.get("word_drop", 0.0))
    if word_drop > 0:
        rng, word_rng = jax.random.split(rng)
        tokens = drop_words(tokens, word_rng, word_drop, model.pad_id)
    out, state = apply_train(model, params, model_state, batch["image"], tokens, rng=rng)
    parts = stream_losses(out["logits"], out["ids"], model.text_len, model.image_offset)
    w = float(config.task.get("text_loss_weight", 1.0 / 8))
    loss = w * parts["text_loss"] + (1.0 - w) * parts["image_loss"]
    metrics = dict(loss=loss, image_perplexity=jnp.exp(parts["image_loss"]), **parts)
    return loss, {"metrics": metrics, "model_state": state}


@functools.partial(jax.jit, static_argnums=0)
def text_stream(model: nn.Module, variables: dict, tokens: jax.Array) -> jax.Array:
    """Tokens [B, L] -> the prompts' text stream ids [B, text_len]."""
    return model.apply(variables, tokens, method=model.text_ids)


@functools.partial(jax.jit, static_argnums=0)
def decode_codes(model: nn.Module, variables: dict, codes: jax.Array) -> jax.Array:
    """Codes [B, grid**2] -> images [B, S, S, 3] through the tokenizer's decoder."""
    return model.apply(variables, codes, method=model.decode_codes)


def sample_codes(model: nn.Module, variables: dict, tokens: Any, rng: jax.Array, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, guidance: float = 0.0, guidance_floor: float = 0.0
                 ) -> np.ndarray:
    """Image codes int32 [B, grid**2] drawn for tokens [B, L] through vlm_jax.sampling."""
    from vlm_jax.sampling import decode

    prompts = np.asarray(text_stream(model, variables, jnp.asarray(tokens)))
    n = model.grid * model.grid
    method = "sample" if temperature > 0 else "greedy"
    out = decode.generate(
        model.make_decoder(guidance, guidance_floor), variables, prompts.tolist(), max_new_tokens=n,
        method=method, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, stop_tokens=(),
    )
    codes = np.asarray(out, np.int32)
    if codes.shape != (len(prompts), n):
        raise RuntimeError(f"dalle sampling gave codes of shape {codes.shape}, expected {(len(prompts), n)}")
    return codes


def generate(model: nn.Module, variables: dict, tokens: jax.Array, rng: jax.Array, config: Any) -> jax.Array:
    """Images [B, S, S, 3] (data-normalised) for tokens [B, L]: sampled codes, decoded."""
    task = config.task
    codes = sample_codes(
        model, variables, tokens, rng, temperature=float(task.get("temperature", 1.0)),
        top_k=int(task.get("top_k", 0)), top_p=float(task.get("top_p", 1.0)),
        guidance=float(task.get("guidance", 0.0)), guidance_floor=float(task.get("guidance_floor", 0.0)),
    )
    return decode_codes(model, variables, jnp.asarray(codes))
