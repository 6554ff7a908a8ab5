"""Language modelling: next-token cross-entropy on the tokens the batch's loss_mask selects.

Batches come from vlm_jax.data.text: tokens, targets, positions, segment_ids int32 [B, L] and
loss_mask float32 [B, L] (1 where a target counts: every token for pretraining, the response for
instruction tuning, 0 on padding). The loss is the mean over all selected tokens of the batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: tokens [B, L], positions [B, L], segment_ids [B, L]."""
    return (batch["tokens"], batch["positions"], batch["segment_ids"])


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, L, V], targets int [B, L] -> negative log-likelihood float32 [B, L]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def masked_nll(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [B, T, V], targets int [B, T], mask [B, T] (1 where a target counts) ->
    (per-token NLL [B, T], 0 where masked; mean NLL over the counted tokens; their token accuracy;
    how many were counted). The one next-token loss of the LM, captioning and CoCa tasks."""
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    nll = token_nll(logits, targets) * mask
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return nll, nll.sum() / count, (correct * mask).sum() / count, mask.sum()


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Mean NLL over the masked target tokens; metrics: loss, token accuracy, tokens counted."""
    del config
    logits, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    _, loss, accuracy, count = masked_nll(logits, batch["targets"], batch["loss_mask"])
    metrics = {"loss": loss, "token_accuracy": accuracy, "loss_tokens": count}
    return loss, {"metrics": metrics, "model_state": model_state}
