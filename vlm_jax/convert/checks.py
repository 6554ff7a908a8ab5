"""Bookkeeping that makes conversions fail loudly: every checkpoint tensor is used exactly once,
and the converted params match the module's own param tree (paths and shapes)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


class Tensors:
    """Checkpoint tensors consumed by name; `finish()` reports any that no rule consumed."""

    def __init__(self, tensors: Mapping[str, np.ndarray], ignore: Iterable[str] = ()) -> None:
        self._tensors = dict(tensors)
        self._ignore = [re.compile(p) for p in ignore]
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._tensors)

    def take(self, key: str) -> np.ndarray:
        """The float32 tensor called `key`; a clear error naming close matches when it is absent."""
        if key not in self._tensors:
            near = difflib.get_close_matches(key, self._tensors, n=3, cutoff=0.6)
            raise ConversionError(
                f"checkpoint has no weight {key!r}" + (f"; close: {near}" if near else "")
            )
        self._used.add(key)
        return np.asarray(self._tensors[key], dtype=np.float32)

    def finish(self) -> None:
        """Raises if some checkpoint tensor was neither used nor deliberately ignored."""
        unused = sorted(
            k
            for k in self._tensors
            if k not in self._used and not any(p.search(k) for p in self._ignore)
        )
        if unused:
            shown = ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else "")
            raise ConversionError(
                f"{len(unused)} checkpoint weights have no place in the model: {shown}"
            )


def check_tree(expected: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Raises ConversionError unless `params` has exactly the paths and shapes of `expected`."""
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
    have = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    problems = [f"missing param {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected param {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [
        f"param {k}: the model expects shape {want[k]}, the checkpoint gives {have[k]}"
        for k in sorted(set(want) & set(have))
        if want[k] != have[k]
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ConversionError(
            f"converted params do not match the model ({len(problems)}):\n  {shown}"
        )


def finish_params(model_cfg: Any, params: dict, inputs: tuple, *, dtype: str, scan_layers: bool) -> dict:
    """The last steps of every conversion: set the model config's dtype and scan_layers, stack the
    layers for nn.scan when asked, and check the params against the built model's own init
    (`inputs`: example inputs for model.init). Returns the (possibly stacked) params."""
    import flax.linen as nn
    import jax

    from vlm_jax.layers.transformer import stack_layers
    from vlm_jax.models import build

    model_cfg.dtype = dtype
    model_cfg.scan_layers = scan_layers
    if scan_layers:
        params = stack_layers(params)
    model = build(model_cfg)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    check_tree(nn.unbox(expected)["params"], params)
    return params
