"""CoCa: contrastive + captioning (Yu et al. 2022).

loss = contrastive_weight * symmetric InfoNCE (tasks.contrastive.softmax_loss) + caption_weight *
token cross-entropy of the caption logits (teacher forcing: logits[:, :-1] against tokens[:, 1:],
padding (pad_id) not counted). Weights from config.task (1.0 and 2.0 by default, as the paper).
Batches: {'image' [B, H, W, 3], 'tokens' int [B, L] = [bos] + pieces + [eos] + pad...}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train
from vlm_jax.tasks.contrastive import softmax_loss
from vlm_jax.tasks.lm import masked_nll

CONTRASTIVE_WEIGHT = 1.0
CAPTION_WEIGHT = 2.0


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B, H, W, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def caption_loss(logits: jax.Array, tokens: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits f32 [B, L, V], tokens [B, L] -> (mean NLL of tokens[:, 1:] given the prefix, token
    accuracy, number of target tokens), both over the non-padding targets only."""
    targets = tokens[:, 1:]
    _, loss, accuracy, count = masked_nll(logits[:, :-1], targets, targets != pad_id)
    return loss, accuracy, count


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Weighted contrastive + captioning loss of a batch and its metrics."""
    out, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    img = out["image_embeds"].astype(jnp.float32)
    txt = out["text_embeds"].astype(jnp.float32)
    contrastive = softmax_loss(img, txt, out["logit_scale"])
    pad_id = config.model.get("text", {}).get("pad_id", 0)
    caption, accuracy, count = caption_loss(out["logits"], batch["tokens"], pad_id)
    w_con = config.task.get("contrastive_weight", CONTRASTIVE_WEIGHT)
    w_cap = config.task.get("caption_weight", CAPTION_WEIGHT)
    loss = w_con * contrastive + w_cap * caption
    sims = img @ txt.T
    metrics = {
        "loss": loss,
        "contrastive_loss": contrastive,
        "caption_loss": caption,
        "token_accuracy": accuracy,
        "caption_tokens": count,
        "logit_scale": out["logit_scale"],
        "batch_i2t_top1": jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])),
    }
    return loss, {"metrics": metrics, "model_state": model_state}
