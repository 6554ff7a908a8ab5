"""Hugging Face ViTModel / ViTForImageClassification -> our ViT config section and params.

Reads both weight namings: the one save_pretrained writes (encoder.layer.i.attention.attention.
query, ...) and transformers 5's module names (layers.i.attention.q_proj, ...)."""

from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.convert import layouts
from vlm_jax.convert.checks import ConversionError, Tensors
from vlm_jax.convert.hf_clip import act

_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    pooler_output_size=None,
    pooler_act="tanh",
)
_BLOCK = dict(
    ln1="layernorm_before",
    query="attention.attention.query",
    key="attention.attention.key",
    value="attention.attention.value",
    out="attention.output.dense",
    ln2="layernorm_after",
    fc1="intermediate.dense",
    fc2="output.dense",
)
# transformers 5 module names -> the saved (legacy) names used above.
_RENAMES = (
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
)
ARCHITECTURES = ("ViTModel", "ViTForImageClassification")
IGNORED = (r"\.position_ids$",)


def canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the `vit.` prefix of task models and maps new-style names to the saved ones."""
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix("vit.")
        for pattern, repl in _RENAMES:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out


def model_config(
    hf: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> ml_collections.ConfigDict:
    """HF ViTConfig dict (+ the checkpoint's weight shapes) -> model section of configs/vit.py."""
    c = {**_DEFAULTS, **hf}
    image_size, patch = c["image_size"], c["patch_size"]
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ConversionError("only square images and patches are supported")
    if c["num_channels"] != 3:
        raise ConversionError(
            f"only RGB inputs are supported, not num_channels={c['num_channels']}"
        )
    representation = 0
    if "pooler.dense.weight" in shapes:
        if c["pooler_act"] != "tanh":
            raise ConversionError(
                f"pooler_act {c['pooler_act']!r}: only tanh pre-logits exist here"
            )
        representation = c["pooler_output_size"] or c["hidden_size"]
    num_classes = 0
    if "classifier.weight" in shapes:
        num_classes = shapes["classifier.weight"][0]
    return ml_collections.ConfigDict(
        dict(
            name="vit",
            image_size=image_size,
            patch_size=patch,
            width=c["hidden_size"],
            depth=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            mlp_ratio=c["intermediate_size"] / c["hidden_size"],
            mlp_dim=c["intermediate_size"],
            pool="cls",
            class_token=True,
            pre_norm=False,
            act=act(c["hidden_act"]),
            ln_eps=c["layer_norm_eps"],
            patch_bias=True,
            qkv_bias=c["qkv_bias"],
            final_norm=True,
            representation_size=representation,
            num_classes=num_classes,
            dtype="float32",
            scan_layers=False,
            remat="none",
        )
    )


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors (canonical names) -> our ViT param tree (unscanned layers)."""
    tree = {
        "patch_embed": layouts.conv(t, "embeddings.patch_embeddings.projection"),
        # Torch keeps a leading [1, 1] / [1] batch axis on these; ours have none.
        "cls_token": t.take("embeddings.cls_token").reshape(-1),
        "pos_embed": {"pos_embedding": t.take("embeddings.position_embeddings")[0]},
        "encoder": {
            f"layers_{i}": layouts.encoder_block(
                t, f"encoder.layer.{i}", _BLOCK, cfg.heads, qkv_bias=cfg.qkv_bias
            )
            for i in range(cfg.depth)
        },
        "ln_final": layouts.layer_norm(t, "layernorm"),
    }
    if cfg.representation_size:
        tree["pre_logits"] = layouts.linear(t, "pooler.dense")
    if cfg.num_classes:
        tree["head"] = layouts.linear(t, "classifier")
    return tree


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, ...]:
    """Inputs for tracing `init`: images [1, S, S, 3]."""
    return (np.zeros((1, cfg.image_size, cfg.image_size, 3), np.float32),)
