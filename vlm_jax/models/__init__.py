"""Model families: `build(config)` returns the linen module named by `config.model.name`."""

from __future__ import annotations

import importlib

import flax.linen as nn
import ml_collections


def build(config: ml_collections.ConfigDict) -> nn.Module:
    """The linen module of a full config (with `.model`) or of a model section (with `.name`)."""
    model_cfg = config.model if "model" in config else config
    if "name" not in model_cfg:
        raise ValueError("build(config): the config has neither `.model` nor a model `.name`")
    try:
        module = importlib.import_module(f"vlm_jax.models.{model_cfg.name}")
    except ModuleNotFoundError as e:
        if e.name != f"vlm_jax.models.{model_cfg.name}":
            raise
        raise ValueError(
            f"unknown model family {model_cfg.name!r} (no vlm_jax/models/{model_cfg.name}.py)"
        ) from e
    return module.from_config(model_cfg)
