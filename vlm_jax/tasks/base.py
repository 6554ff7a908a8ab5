"""What every task's loss needs: applying a model with its mutable state during training."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def apply_train(
    model: nn.Module, params: Any, model_state: dict, *args, rng: jax.Array, **kwargs
) -> tuple[Any, dict]:
    """model.apply in training mode -> (outputs, updated model_state, e.g. BatchNorm statistics)."""
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng}
    if model_state:
        out, new_state = model.apply(
            variables, *args, train=True, rngs=rngs, mutable=list(model_state), **kwargs
        )
        return out, dict(new_state)
    return model.apply(variables, *args, train=True, rngs=rngs, **kwargs), model_state
