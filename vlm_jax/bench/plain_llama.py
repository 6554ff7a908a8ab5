"""A minimal functional LLaMA in plain JAX (no flax): the GPU report's "what plain JAX does" peer
for the LLaMA train step.

Params are a nested dict with the keys and shapes of vlm_jax's scanned Llama (layers stacked on a
leading [depth] axis): embed/embedding [V, E]; layers/{attn_norm/scale [L, E], attn/{query
[L, E, H, D], key / value [L, E, K, D], out [L, H, D, E]}/kernel, mlp_norm/scale [L, E],
mlp/{gate, up [L, E, F], down [L, F, E]}/kernel}; final_norm/scale [E]; lm_head/kernel [E, V].
So the parameter count is ours by construction, and our params run through this model unchanged
(tests/bench/test_bench_gpu.py compares the losses). The layers run under `jax.lax.scan`, each
under `jax.checkpoint` saving the projection matmuls; attention is jax.nn.dot_product_attention
(cuDNN on a GPU); float32 params, compute in `dtype`, norms and rotary in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.bench.plain_common import REMAT_POLICY, attention, normal_params, rms_norm


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shape of a LLaMA (a model section of configs/llama.py)."""

    vocab: int
    width: int
    depth: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    eps: float
    theta: float

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Sizes:
        """From configs/llama.py's model section; ValueError for what this peer does not model."""
        if cfg.get("tie_embeddings", False) or (cfg.get("lora") and cfg.lora.get("rank", 0)):
            raise ValueError("the plain-JAX LLaMA has no tied embeddings and no LoRA")
        return cls(int(cfg.vocab_size), int(cfg.width), int(cfg.depth), int(cfg.heads),
                   int(cfg.kv_heads), int(cfg.head_dim or cfg.width // cfg.heads), int(cfg.mlp_dim),
                   float(cfg.norm_eps), float(cfg.rope_theta))


def param_shapes(s: Sizes) -> dict[str, Any]:
    """The param tree's shapes (see the module docstring)."""
    l, e, h, k, d, f = s.depth, s.width, s.heads, s.kv_heads, s.head_dim, s.mlp
    kernel = lambda *shape: {"kernel": shape}  # noqa: E731
    return {
        "embed": {"embedding": (s.vocab, e)},
        "layers": {
            "attn_norm": {"scale": (l, e)},
            "attn": {"query": kernel(l, e, h, d), "key": kernel(l, e, k, d), "value": kernel(l, e, k, d),
                     "out": kernel(l, h, d, e)},
            "mlp_norm": {"scale": (l, e)},
            "mlp": {"gate": kernel(l, e, f), "up": kernel(l, e, f), "down": kernel(l, f, e)},
        },
        "final_norm": {"scale": (e,)},
        "lm_head": kernel(e, s.vocab),
    }


def init_params(s: Sizes, key: jax.Array) -> dict[str, Any]:
    """Random float32 params: normal(0.02) matrices (Hugging Face's LLaMA init), unit norm scales."""
    return normal_params(key, param_shapes(s), lambda shape: 0.02)


def _rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, H, D] at positions 0..T-1, half-split pairs (i, i + D/2)."""
    t, d = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv  # [T, D/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _block(s: Sizes, dtype: Any, impl: str | None, x: jax.Array, p: dict[str, Any]) -> tuple[jax.Array, None]:
    """One decoder layer, x [B, T, E] -> ([B, T, E], None) (a scan body over the stacked params)."""
    w = jax.tree.map(lambda a: a.astype(dtype), p)
    h = rms_norm(x, p["attn_norm"]["scale"], s.eps)
    q = _rope(jnp.einsum("bte,ehd->bthd", h, w["attn"]["query"]["kernel"]), s.theta)
    k = _rope(jnp.einsum("bte,ehd->bthd", h, w["attn"]["key"]["kernel"]), s.theta)
    v = jnp.einsum("bte,ehd->bthd", h, w["attn"]["value"]["kernel"])
    o = attention(q, k, v, causal=True, impl=impl)
    x = x + jnp.einsum("bthd,hde->bte", o, w["attn"]["out"]["kernel"])
    h = rms_norm(x, p["mlp_norm"]["scale"], s.eps)
    m = w["mlp"]
    gated = jax.nn.silu(h @ m["gate"]["kernel"]) * (h @ m["up"]["kernel"])
    return x + gated @ m["down"]["kernel"], None


def forward(params: dict[str, Any], tokens: jax.Array, s: Sizes, *, dtype: Any = jnp.bfloat16,
            impl: str | None = None, remat: bool = True) -> jax.Array:
    """tokens int [B, T] -> logits float32 [B, T, V] (causal)."""
    x = jnp.take(params["embed"]["embedding"].astype(dtype), tokens, axis=0)
    body = functools.partial(_block, s, dtype, impl)
    if remat:
        body = jax.checkpoint(body, policy=REMAT_POLICY, prevent_cse=False)  # Under scan: no CSE to fear.
    x, _ = jax.lax.scan(body, x, params["layers"])
    x = rms_norm(x, params["final_norm"]["scale"], s.eps)
    return (x @ params["lm_head"]["kernel"].astype(dtype)).astype(jnp.float32)


def loss(params: dict[str, Any], tokens: jax.Array, s: Sizes, *, dtype: Any = jnp.bfloat16,
         impl: str | None = None, remat: bool = True) -> jax.Array:
    """Mean next-token cross-entropy of tokens [B, T]: B x (T - 1) predictions (as vlm_jax.tasks.lm
    on whole rows, and LlamaForCausalLM(labels=tokens))."""
    logits = forward(params, tokens, s, dtype=dtype, impl=impl, remat=remat)[:, :-1]
    targets = tokens[:, 1:]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)
