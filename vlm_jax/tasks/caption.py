"""Image captioning (Show and Tell, Show Attend and Tell): next-token cross-entropy of the caption
given the image, with teacher forcing.

Batches come from vlm_jax.data.pipeline: image f32 [B, S, S, 3], tokens int32 [B, L] =
[bos] + pieces + [eos] + pad (pad id config.task.pad_id, 0). The model maps (image, tokens) to
logits [B, L, V] (or a dict with "logits") whose position t predicts tokens[:, t + 1], so the loss
is the cross-entropy of logits[:, :-1] against tokens[:, 1:], averaged over the non-pad targets.

Attention models (a dict with "alphas" [B, L, N locations]) add the doubly stochastic penalty
    attention_penalty * sum_b sum_i (1 - sum_t alpha_bti)^2 / n_tokens
over the steps t that predict a real token (Xu et al. 2015, eq. 14). Their objective is the
caption's summed NLL plus lambda times the penalty, per caption; dividing both by the number of
tokens (as the NLL above is) keeps that balance. (Per caption against a per-token NLL, the penalty,
about N (1 - T/N)^2 for N locations and T steps, would swamp the NLL.)

Hard attention (a dict with "loc_logprob" [B, L]) adds the REINFORCE terms of Xu et al. sec. 4.1:
with the reward r_b = log p(y_b | s, a) (minus the sequence NLL, no gradient) and a moving-average
baseline b (model_state["reinforce"], b <- decay * b + (1 - decay) * mean_b r_b, started at the
first batch's mean),
    - reinforce_weight * sum_b (r_b - b) * sum_t log p(s_bt | a) / n_tokens
    - entropy_weight * sum_bt H[alpha_bt] / n_tokens
so the gradient is the paper's estimator (the NLL term gives d log p(y | s, a)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train
from vlm_jax.tasks.lm import masked_nll


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B, H, W, 3] and tokens [B, L]."""
    return (batch["image"], batch["tokens"])


def attention_penalty(alphas: jax.Array, mask: jax.Array) -> jax.Array:
    """alphas [B, T, N], mask [B, T] (the steps that count) -> sum_i (1 - sum_t alpha_ti)^2 [B]."""
    total = jnp.einsum("btn,bt->bn", alphas.astype(jnp.float32), mask.astype(jnp.float32))
    return jnp.sum(jnp.square(1.0 - total), axis=-1)


def _get(cfg: ml_collections.ConfigDict, key: str, default: Any) -> Any:
    return cfg.get(key, default) if cfg is not None else default


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Masked caption NLL (+ attention penalty, + REINFORCE terms); metrics: loss, nll,
    token_accuracy, loss_tokens (+ attention_penalty, reward, baseline, attention_entropy)."""
    task = config.get("task")
    out, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    outputs = out if isinstance(out, dict) else {"logits": out}
    tokens = batch["tokens"]
    logits, targets = outputs["logits"][:, :-1], tokens[:, 1:]
    mask = (targets != _get(task, "pad_id", 0)).astype(jnp.float32)
    nll, ce, accuracy, n_tokens = masked_nll(logits, targets, mask)
    count = jnp.maximum(n_tokens, 1.0)
    metrics = {"nll": ce, "token_accuracy": accuracy, "loss_tokens": n_tokens}
    loss = ce

    if "alphas" in outputs:
        per_caption = attention_penalty(outputs["alphas"][:, :-1], mask)  # [B]
        metrics["attention_penalty"] = per_caption.mean()
        loss = loss + _get(task, "attention_penalty", 1.0) * per_caption.sum() / count

    if "loc_logprob" in outputs:
        reward = jax.lax.stop_gradient(-nll.sum(axis=1))  # log p(y | s, a) per caption [B]
        state = dict(model_state.get("reinforce", {}))
        baseline, updates = state.get("baseline", jnp.zeros(())), state.get("updates", jnp.zeros((), jnp.int32))
        baseline = jnp.where(updates > 0, baseline, reward.mean())
        advantage = reward - baseline
        logp_loc = (outputs["loc_logprob"][:, :-1] * mask).sum(axis=1)
        entropy = (outputs["attention_entropy"][:, :-1] * mask).sum() / count
        loss = loss - _get(task, "reinforce_weight", 1.0) * jnp.sum(advantage * logp_loc) / count
        loss = loss - _get(task, "entropy_weight", 0.01) * entropy
        decay = _get(task, "baseline_decay", 0.9)
        if "reinforce" in model_state:
            new_baseline = decay * baseline + (1.0 - decay) * reward.mean()
            model_state = dict(model_state, reinforce={"baseline": new_baseline, "updates": updates + 1})
        metrics.update(reward=reward.mean(), baseline=baseline, attention_entropy=entropy)

    metrics["loss"] = loss
    return loss, {"metrics": metrics, "model_state": model_state}
