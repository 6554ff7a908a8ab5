"""Pre-norm transformer encoder: the block, and a stack of blocks (python loop or nn.scan, with
optional remat). Scanned params live under `layers` with a leading [depth] axis; looped ones
under `layers_0 ... layers_{depth-1}`; `stack_layers` / `unstack_layers` convert between them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.attention import MultiHeadAttention
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm

REMAT_POLICIES = {
    # Nothing saved: every activation of the block is recomputed on the backward pass.
    "full": None,
    # Projection matmul outputs are kept; attention scores and elementwise ops are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACT_AXES = ("batch", "length", "embed")


class EncoderBlock(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x)): [B, T, E] -> [B, T, E]."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-6
    causal: bool = False
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    impl: str = "auto"  # vlm_jax.kernels.attention's implementation
    # Under nn.scan the body must map (carry, x) -> (carry, y).
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array | tuple[jax.Array, None]:
        """x [B, T, E] -> [B, T, E] (or (x, None) when scanned); segment_ids int [B, T]: keys of
        another segment are masked (e.g. id 0 for pads, 1 for the rest)."""
        x = nn.with_logical_constraint(x, _ACT_AXES)
        y = LayerNorm(self.ln_eps, self.dtype, name="ln1")(x)
        y = MultiHeadAttention(
            self.num_heads,
            causal=self.causal,
            qkv_bias=self.qkv_bias,
            dtype=self.dtype,
            impl=self.impl,
            name="attn",
        )(y, segment_ids=segment_ids)
        x = x + y
        y = LayerNorm(self.ln_eps, self.dtype, name="ln2")(x)
        x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
        x = nn.with_logical_constraint(x, _ACT_AXES)
        return (x, None) if self.scanned else x


class Encoder(nn.Module):
    """`depth` EncoderBlocks: [B, T, E] -> [B, T, E]; no final norm (the model owns it)."""

    depth: int
    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    ln_eps: float = 1e-6
    causal: bool = False
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    impl: str = "auto"
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, E] -> [B, T, E]; segment_ids int [B, T] as EncoderBlock takes them."""
        block = EncoderBlock
        if self.remat != "none":
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"remat {self.remat!r}: choose none, {', '.join(REMAT_POLICIES)}")
            # Under scan, CSE cannot merge the recomputation with the forward pass anyway, and the
            # extra barriers prevent_cse inserts only slow the loop down.
            block = nn.remat(
                block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers
            )
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            act=self.act,
            ln_eps=self.ln_eps,
            causal=self.causal,
            qkv_bias=self.qkv_bias,
            dtype=self.dtype,
            impl=self.impl,
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, scanned=True, name="layers")(x, segment_ids)
            return x
        for i in range(self.depth):
            x = block(**kwargs, name=f"layers_{i}")(x, segment_ids)
        return x


def mlp_dim_from(cfg: Mapping[str, Any]) -> int:
    """MLP width of a tower config: `mlp_dim` when set (> 0), else round(mlp_ratio * width)."""
    if cfg.get("mlp_dim", 0):
        return int(cfg["mlp_dim"])
    return int(round(cfg.get("mlp_ratio", 4.0) * cfg["width"]))


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Looped layer params {layers_i: T} -> scanned layout {layers: T with a leading [depth]}."""
    out: dict[str, Any] = {}
    layers: dict[int, Any] = {}
    for key, value in tree.items():
        match = _LAYER_KEY.match(key)
        if match:
            layers[int(match.group(1))] = value
        elif isinstance(value, Mapping):
            out[key] = stack_layers(value)
        else:
            out[key] = value
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"layers are not numbered 0..n-1: {sorted(layers)}")
        ordered = [layers[i] for i in range(len(layers))]
        out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ordered)
    return out


def unstack_layers(tree: Mapping[str, Any], depth_key: str = "layers") -> dict[str, Any]:
    """Inverse of stack_layers: {layers: T [depth, ...]} -> {layers_i: T}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == depth_key and isinstance(value, Mapping):
            depth = jax.tree.leaves(value)[0].shape[0]
            for i in range(depth):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        elif isinstance(value, Mapping):
            out[key] = unstack_layers(value, depth_key)
        else:
            out[key] = value
    return out
