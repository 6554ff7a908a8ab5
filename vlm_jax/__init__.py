"""vlm_jax: train, evaluate and sample image-text models in JAX/Flax, from a CPU to TPU pods.

    import vlm_jax
    config, params = vlm_jax.convert.from_hf("path/to/hf_dir")
    model = vlm_jax.models.build(config)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("config", "convert", "data", "evals", "kernels", "layers", "models", "parallel", "tasks", "train")


def __getattr__(name: str):
    # Submodules load on first use, so `import vlm_jax` stays cheap for the CLI and configs.
    if name in _SUBMODULES:
        return importlib.import_module(f"vlm_jax.{name}")
    raise AttributeError(f"module 'vlm_jax' has no attribute {name!r}")
