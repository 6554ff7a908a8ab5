"""Where a captioner looked: per generated token, an attention map over the image grid.

    image_attention(model, variables, images, tokens) -> f32 [B, T, h, w]

`tokens` [B, T] is a caption fed with teacher forcing ([bos] + generated tokens); row t of the
result is the attention with which token t + 1 was predicted (so the map of generated token p,
at position p, is row p - 1). Each map sums to 1 over the h x w grid, which covers the image
evenly (cell (r, c) spans rows r * H / h .. (r + 1) * H / h of an H-pixel image).

- Show, Attend and Tell: the alphas over its L = h x w annotation vectors (hard attention: the
  distribution the location is drawn from).
- CoCa: the text decoder attends to the captioning pooler's N queries, which attend to the image
  patches. The map is the product of the two (an attention rollout through the pooler): the
  multimodal layers' cross-attention [T, N], averaged over heads and layers, times the captioning
  pooler's attention [N, patches], averaged over heads. Both are recomputed from the query and key
  projections captured during one forward pass (the attention kernels do not return weights).
  With open_clip pooling, the pooler's weight on the ViT's class token is dropped and the rest
  renormalised.
"""

from __future__ import annotations

import functools

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.parallel import hosts


def _square(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} locations are not a square grid")
    return side


def has_image_attention(model: Any) -> bool:
    from vlm_jax.models.coca import CoCa
    from vlm_jax.models.show_attend_tell import ShowAttendTell

    return isinstance(model, (ShowAttendTell, CoCa))


def image_attention(model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> np.ndarray:
    """Attention maps f32 [B, T, h, w] of captions tokens [B, T] (see the module docstring)."""
    return as_grid(_compiled_maps(model)(variables, images, tokens))  # flat_attention says why it cannot


@functools.lru_cache(maxsize=8)
def _compiled_maps(model: Any) -> Any:
    """flat_attention of one model, jitted once (flax modules hash by their fields): eager flax
    applies run op by op, several times slower on a CPU."""
    return jax.jit(functools.partial(flat_attention, model))


def flat_attention(model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """The maps with the grid flattened, f32 [B, T, h * w] (jittable; as_grid reshapes them)."""
    from vlm_jax.models.coca import CoCa
    from vlm_jax.models.show_attend_tell import ShowAttendTell, attention_maps

    if isinstance(model, ShowAttendTell):
        return attention_maps(model, variables, images, tokens).astype(jnp.float32)
    if isinstance(model, CoCa):
        return _coca_rollout(model, variables, images, tokens)
    raise ValueError(f"{type(model).__name__} has no attention over the image to show")


def as_grid(maps: jax.Array | np.ndarray) -> np.ndarray:
    """[B, T, L] -> [B, T, h, w] (L = h * w, a square grid)."""
    maps = np.asarray(hosts.fetch(maps), np.float32)  # maps of a batch split over hosts: gathered
    side = _square(maps.shape[-1], "the attention grid")
    return maps.reshape(maps.shape[:-1] + (side, side))


def _weights(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [B, Tq, H, D], k [B, Tk, H, D] -> softmax attention, mean over heads [B, Tq, Tk] (f32)."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


def _captured(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], jax.Array]:
    """{module path: output} of the captured intermediates ('__call__' leaves)."""
    out = {}
    for name, value in tree.items():
        if name == "__call__":
            out[path] = value[0]
        elif isinstance(value, dict) or hasattr(value, "items"):
            out.update(_captured(value, path + (name,)))
    return out


def _coca_rollout(model: Any, variables: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T, patches]: cross-attention (mean over heads and multimodal layers) @ captioning pooler."""
    from vlm_jax.models.show_tell import variables_of

    pooler = "pooler" if model.pooling == "open_clip" else "caption_pooler"

    def wanted(module, method: str) -> bool:
        path = module.path if hasattr(module, "path") else ()
        return method == "__call__" and module.name in ("query", "key") and (
            (len(path) >= 3 and path[-3] == pooler) or "cross_attn" in path
        )

    _, state = model.apply(variables_of(variables), images, tokens, capture_intermediates=wanted,
                           mutable=["intermediates"])
    got = _captured(state["intermediates"])
    pool = _weights(got[(pooler, "attn", "query")], got[(pooler, "attn", "key")])  # [B, Nq, P]
    if model.pooling == "open_clip":
        pool = pool[:, 1:, 1:]  # the caption queries (output 0 is the contrastive one), patches only
        pool = pool / pool.sum(axis=-1, keepdims=True)
    layers = sorted({p[:-2] for p in got if p[-2] == "cross_attn"})
    if not layers:
        raise ValueError("CoCa has no multimodal layers to take cross-attention from")
    cross = []
    for layer in layers:
        q, k = got[layer + ("cross_attn", "query")], got[layer + ("cross_attn", "key")]
        if q.ndim == 5:  # scanned layers: [layers, B, T, H, D]
            cross.extend(_weights(qi, ki) for qi, ki in zip(q, k))
        else:
            cross.append(_weights(q, k))
    return jnp.einsum("btn,bnp->btp", jnp.mean(jnp.stack(cross), axis=0), pool)
