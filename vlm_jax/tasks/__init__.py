"""Training recipes. A task module defines

    model_inputs(batch) -> tuple of the model's positional inputs (also used to initialise it)
    loss_fn(model, params, batch, rng, config, model_state) -> (loss, {"metrics": ..., "model_state": ...})

where `model_state` holds the model's non-parameter collections (e.g. BatchNorm statistics; {} for
most models). A loss_fn with a keyword `step` also gets the train step (an int32 scalar) for
schedules inside the loss. The trainer finds the module from `config.task.name`.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def get(name: str) -> ModuleType:
    """The task module vlm_jax.tasks.<name>."""
    try:
        return importlib.import_module(f"vlm_jax.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"vlm_jax.tasks.{name}":
            raise ValueError(f"unknown task {name!r}: there is no vlm_jax/tasks/{name}.py") from e
        raise
