"""Hugging Face CLIPModel (config.json + safetensors) -> our CLIP config section and params."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.convert import layouts
from vlm_jax.convert.checks import ConversionError, Tensors

# CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that leave keys out.
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    num_channels=3,
)
_ACTS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_BLOCK = dict(
    ln1="layer_norm1",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    out="self_attn.out_proj",
    ln2="layer_norm2",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
)
# Non-persistent buffers that older exports wrote out.
IGNORED = (r"\.position_ids$",)
ARCHITECTURES = ("CLIPModel",)


def act(name: str) -> str:
    """An HF hidden_act -> our activation name."""
    if name not in _ACTS:
        raise ConversionError(f"hidden_act {name!r} has no equivalent here; known: {sorted(_ACTS)}")
    return _ACTS[name]


def _section(hf: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    # Old exports kept the user's overrides under `<name>_dict`.
    return {**defaults, **(hf.get(f"{name}_dict") or {}), **(hf.get(name) or {})}


def model_config(
    hf: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> ml_collections.ConfigDict:
    """HF CLIPConfig dict -> model section of configs/clip.py (float32, unscanned)."""
    del shapes  # CLIPModel's layout does not depend on which optional weights exist.
    vc = _section(hf, "vision_config", _VISION_DEFAULTS)
    image_size, patch = vc["image_size"], vc["patch_size"]
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ConversionError("only square images and patches are supported")
    if vc["num_channels"] != 3:
        raise ConversionError(
            f"only RGB inputs are supported, not num_channels={vc['num_channels']}"
        )
    return ml_collections.ConfigDict(
        dict(
            name="clip",
            embed_dim=hf.get("projection_dim", 512),
            image=dict(
                kind="vit",
                image_size=image_size,
                patch_size=patch,
                width=vc["hidden_size"],
                depth=vc["num_hidden_layers"],
                heads=vc["num_attention_heads"],
                mlp_ratio=vc["intermediate_size"] / vc["hidden_size"],
                pool="cls",
                pre_norm=True,
                act=act(vc["hidden_act"]),
                ln_eps=vc["layer_norm_eps"],
                patch_bias=False,
            ),
            text=text_section(_section(hf, "text_config", {})),
            loss="softmax",
            logit_scale_init=float(hf.get("logit_scale_init_value", math.log(1 / 0.07))),
            logit_scale_max=math.log(100.0),
            logit_bias_init=-10.0,
            dtype="float32",
            scan_layers=False,
            remat="none",
        )
    )


def text_section(text_config: dict[str, Any]) -> dict[str, Any]:
    """An HF CLIPTextConfig dict (CLIPConfig's text_config, or a CLIPTextModel's config.json; missing
    keys take transformers' defaults) -> our text tower's settings (models.text)."""
    tc = {**_TEXT_DEFAULTS, **text_config}
    eos = tc["eos_token_id"]
    if eos == 2:
        # HF's legacy configs say 2 but pool at the highest id (argmax over the ids), which is
        # the end-of-text token of CLIP's vocabulary: its last entry.
        eos = tc["vocab_size"] - 1
        warnings.warn(
            f"config.json has the legacy eos_token_id 2; pooling at token {eos} instead",
            stacklevel=3,
        )
    return dict(
        vocab_size=tc["vocab_size"],
        act=act(tc["hidden_act"]),
        ln_eps=tc["layer_norm_eps"],
        pad_id=tc.get("pad_token_id") or 0,
        eos_id=eos,
        context_length=tc["max_position_embeddings"],
        width=tc["hidden_size"],
        depth=tc["num_hidden_layers"],
        heads=tc["num_attention_heads"],
        mlp_ratio=tc["intermediate_size"] / tc["hidden_size"],
    )


def text_tower_params(t: Tensors, prefix: str, text: ml_collections.ConfigDict) -> dict:
    """The text tower's params from the tensors under `prefix` (e.g. "text_model."): embeddings,
    encoder layers and the final LayerNorm (models.text.TextTransformer's tree)."""
    return {
        "token_embedding": {"embedding": t.take(f"{prefix}embeddings.token_embedding.weight")},
        "pos_embed": {"pos_embedding": t.take(f"{prefix}embeddings.position_embedding.weight")},
        "encoder": _encoder(t, f"{prefix}encoder", text.depth, text.heads),
        "ln_final": layouts.layer_norm(t, f"{prefix}final_layer_norm"),
    }


def _encoder(t: Tensors, prefix: str, depth: int, heads: int) -> dict:
    return {
        f"layers_{i}": layouts.encoder_block(t, f"{prefix}.layers.{i}", _BLOCK, heads)
        for i in range(depth)
    }


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors -> our CLIP param tree (unscanned layers)."""
    v, x = "vision_model", "text_model"
    image = {
        "patch_embed": layouts.conv(t, f"{v}.embeddings.patch_embedding", bias=False),
        "cls_token": t.take(f"{v}.embeddings.class_embedding"),
        "pos_embed": {"pos_embedding": t.take(f"{v}.embeddings.position_embedding.weight")},
        "ln_pre": layouts.layer_norm(t, f"{v}.pre_layrnorm"),
        "encoder": _encoder(t, f"{v}.encoder", cfg.image.depth, cfg.image.heads),
        "ln_final": layouts.layer_norm(t, f"{v}.post_layernorm"),
    }
    text = text_tower_params(t, f"{x}.", cfg.text)
    return {
        "image": image,
        "image_projection": layouts.linear(t, "visual_projection", bias=False),
        "text": text,
        "text_projection": layouts.linear(t, "text_projection", bias=False),
        "logit_scale": t.take("logit_scale").reshape(()),
    }


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[jnp.ndarray, ...]:
    """Inputs for tracing `init`: images [1, S, S, 3] and tokens [1, context_length]."""
    size = cfg.image.image_size
    return (
        np.zeros((1, size, size, 3), np.float32),
        np.zeros((1, cfg.text.context_length), np.int32),
    )
