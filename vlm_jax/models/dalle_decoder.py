"""Cached decoding for DALL-E (models.dalle): the Decoder that vlm_jax.sampling drives, with
classifier-free guidance for an autoregressive model.

Prompts are the text stream's ids (text_len of them, pads included), the tokens fed back are image
codes, and the logits are the image codes' [B, T, K], so top-k / top-p act over image tokens only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def _variables(params: Any) -> dict:
    """The decoder's `params`: the model's variables ({"params": ..., "vq_stats": ...}, which a
    model with code_features needs: its tokenizer's codebook) or its params alone."""
    return dict(params) if "params" in params else {"params": params}


@dataclasses.dataclass(frozen=True)
class DalleDecoder:
    """vlm_jax.sampling's Decoder for a Dalle: prompts are text stream ids (text_len of them), the
    tokens fed back are image codes, the logits are the image codes' [B, T, K]. Its `params` are
    the model's variables (or its params alone, without code_features).

    guidance s > 0: classifier-free guidance for an autoregressive model (as Make-A-Scene and Parti
    sample): every row also runs unconditioned, its text all pads (the stream a model trained with
    task.text_drop saw for a dropped caption), in a second half of the cache, and the logits are
    l_uncond + s * (l_cond - l_uncond); both halves are fed the same sampled codes. s = 1 is the
    conditional model; 0 turns guidance off (one half, no extra compute). guidance_floor a in (0, 1):
    only codes the conditional model finds plausible, p_cond >= a * max p_cond, stay drawable (the
    plausibility constraint of contrastive decoding, Li et al. 2022): strong guidance then sharpens
    the choice among those without breaking the image with codes the model would never draw."""

    model: Any  # a models.dalle.Dalle
    guidance: float = 0.0
    guidance_floor: float = 0.0

    @property
    def guided(self) -> bool:
        return self.guidance > 0

    @property
    def max_len(self) -> int:
        return self.model.seq_len

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> Any:
        del params, context
        m = self.model
        ids = jnp.zeros((batch_size * (2 if self.guided else 1), 1), jnp.int32)
        shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), ids, decode=True, method=m.logits))["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, -1) if path[-1].key == "cached_position" else x, cache
        )

    def step(self, params, cache, tokens, positions, valid):
        m = self.model
        ids = jnp.where(positions >= m.text_len, m.image_offset + tokens, tokens)
        positions = jnp.where(valid, positions, -1)
        if self.guided:  # the unconditioned half: every text position its own pad id
            ids = jnp.concatenate([ids, jnp.where(positions < m.text_len, m.text_vocab + positions, ids)], axis=0)
            positions = jnp.concatenate([positions, positions], axis=0)
        logits, variables = m.apply({**_variables(params), "cache": cache}, ids, positions, decode=True,
                                    method=m.logits, mutable=["cache"])
        logits = logits[..., m.image_offset:]
        if self.guided:
            cond, uncond = jnp.split(logits, 2, axis=0)
            logits = uncond + self.guidance * (cond - uncond)
            if self.guidance_floor > 0:
                logp = jax.nn.log_softmax(cond, axis=-1)
                plausible = logp >= jnp.max(logp, axis=-1, keepdims=True) + jnp.log(self.guidance_floor)
                logits = jnp.where(plausible, logits, -jnp.inf)
        return logits, variables["cache"]

    def select(self, cache: Any, rows: jax.Array) -> Any:
        def gather(path, x):
            if path[-1].key == "cache_index":
                return x
            axis = 1 if any(getattr(k, "key", None) == "layers" for k in path) else 0  # scanned: [groups, B, ...]
            if self.guided:  # the same rows of both halves
                return jnp.take(x, jnp.concatenate([rows, rows + x.shape[axis] // 2]), axis=axis)
            return jnp.take(x, rows, axis=axis)

        return jax.tree_util.tree_map_with_path(gather, cache)
