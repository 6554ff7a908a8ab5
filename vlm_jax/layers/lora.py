"""LoRA bookkeeping (Hu et al. 2021): which params train, the trees that hold only those, and the
merge of adapters into the base weights for export.

The adapters themselves live in layers.linear.DenseGeneral (lora_a [*in, r], lora_b [r, *out]).
With adapters on, only they train: the base weights get no gradient, no optimiser state and no
place in the run's checkpoints (they come back from `train.init_from`, or from the seed).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_NAMES = ("lora_a", "lora_b")


def _names(path: tuple) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def path_string(path: tuple) -> str:
    """'layers_0/attn/query/kernel' for a tree path (boxes' attribute keys dropped)."""
    return "/".join(_names(path))


def is_adapter(path: tuple) -> bool:
    """Whether a tree path ends in a LoRA adapter leaf."""
    names = _names(path)
    return bool(names) and names[-1] in ADAPTER_NAMES


def trainable_mask(params: Any, *, adapters_only: bool = False, pattern: str = "") -> Any:
    """Tree of bools like params: True where the param trains.

    adapters_only: only LoRA adapters train. pattern: a regex searched in each param's path
    ('layers_0/attn/query/kernel'); only matching params train. Neither: everything trains.
    """
    regex = re.compile(pattern) if pattern else None

    def trains(path, _):
        if adapters_only:
            return is_adapter(path)
        return regex is None or bool(regex.search(path_string(path)))

    return jax.tree_util.tree_map_with_path(trains, params)


def subset(tree: dict, mask: Any) -> dict:
    """The nested dict of only the leaves where mask is True (empty branches dropped)."""
    out: dict = {}
    for (path, leaf), keep in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(mask)
    ):
        if not keep:
            continue
        node = out
        names = _names(path)
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def overlay(full: dict, part: dict) -> dict:
    """`full` with the leaves that `part` (a subset of the same nesting) has replaced by part's."""
    out = dict(full)
    for key, value in part.items():
        out[key] = overlay(full[key], value) if isinstance(value, dict) else value
    return out


def merge(params: dict, alpha: float) -> dict:
    """Params with every adapter folded into its kernel (kernel += a . b * alpha / rank) and the
    adapter leaves removed: plain weights, as an export to another framework wants them.

    Works for scanned layers too (a leading [depth] axis on kernel, lora_a and lora_b).
    """
    out = {}
    for key, value in params.items():
        if not isinstance(value, dict):
            out[key] = value
        elif "lora_a" in value and "lora_b" in value:
            kernel, a, b = value["kernel"], value["lora_a"], value["lora_b"]
            rank = a.shape[-1]
            lead = a.ndim + b.ndim - 2 - kernel.ndim
            lead_shape = kernel.shape[:lead]
            n_in = int(np.prod(a.shape[lead:-1]))
            a2 = jnp.reshape(a, lead_shape + (n_in, rank)).astype(jnp.float32)
            b2 = jnp.reshape(b, lead_shape + (rank, -1)).astype(jnp.float32)
            delta = jnp.matmul(a2, b2).reshape(kernel.shape) * (alpha / rank)
            out[key] = {k: v for k, v in value.items() if k not in ADAPTER_NAMES}
            out[key]["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        else:
            out[key] = merge(value, alpha)
    return out


def has_adapters(params: Any) -> bool:
    """Whether any leaf of the tree is a LoRA adapter."""
    return any(is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
