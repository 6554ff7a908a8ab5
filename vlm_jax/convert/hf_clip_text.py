"""Hugging Face CLIPTextModel (config.json + safetensors; a Stable Diffusion folder's `text_encoder/`)
-> our TextTransformer (`vlm_jax.models.text`, family "text") config section and params.

The converted model's `hidden` output is transformers' `last_hidden_state` (after final_layer_norm)
for a call without attention_mask, as Stable Diffusion's pipelines call it; `pooled` is its
`pooler_output` (the features at the first end-of-text token). The per-layer mapping and the
text-section settings are hf_clip's (the same tower inside CLIPModel).

CLIPTextModelWithProjection (SDXL's second text encoder) is refused: our text family has no
projection head.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlm_jax.convert import hf_clip
from vlm_jax.convert.checks import ConversionError, Tensors

ARCHITECTURES = ("CLIPTextModel",)
IGNORED = hf_clip.IGNORED
# Hub checkpoints (and transformers < 5) name the weights `text_model.embeddings...`; transformers
# 5's CLIPTextModel has no `text_model` wrapper and saves `embeddings...`. Both are read.
_PREFIXES = ("text_model.", "")


def model_config(hf: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None) -> ml_collections.ConfigDict:
    """HF CLIPTextConfig dict (model_type "clip_text_model") -> a model section that
    `vlm_jax.models.build` turns into a TextTransformer (float32, unscanned, causal)."""
    archs = hf.get("architectures") or []
    if archs and not set(archs) & set(ARCHITECTURES):
        raise ConversionError(
            f"architectures {archs}: CLIP text import reads {ARCHITECTURES}"
            + (" (the text_projection head has no place in our text family)"
               if "CLIPTextModelWithProjection" in archs else "")
        )
    if shapes and "text_projection.weight" in shapes:
        raise ConversionError("the checkpoint has a text_projection: CLIPTextModelWithProjection is not supported")
    text = hf_clip.text_section(hf)
    return ml_collections.ConfigDict(
        dict(name="text", kind="transformer", causal=True, dtype="float32", scan_layers=False, remat="none", **text)
    )


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors -> our TextTransformer param tree (unscanned layers)."""
    x = next((p for p in _PREFIXES if f"{p}embeddings.token_embedding.weight" in t), _PREFIXES[0])
    return hf_clip.text_tower_params(t, x, cfg)


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, ...]:
    """Inputs for tracing `init`: tokens [1, context_length]."""
    return (np.zeros((1, cfg.context_length), np.int32),)
