"""diffusers UNet2DConditionModel (unet/config.json + safetensors) -> our "unet" config section and params.

Built: the Stable-Diffusion family (SD 1.x: 1x1-conv transformer projections, heads per block from
`attention_head_dim`; SD 2.x: `use_linear_projection`, a per-block `attention_head_dim` list) with
block types CrossAttnDownBlock2D / DownBlock2D / AttnDownBlock2D, CrossAttnUpBlock2D / UpBlock2D /
AttnUpBlock2D, mid blocks UNetMidBlock2DCrossAttn / UNetMidBlock2D / none, and a pooled condition
from `class_embed_type` "projection" (two layers) or "simple_projection" (one). Every other option
that changes the computation (addition embeddings, encoder_hid_proj, scale-shift time conditioning,
Fourier time embeddings, dual / only cross-attention, GLIGEN, ...) raises ConversionError.

`upcast_attention` is accepted: our attention always forms its logits in float32.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlm_jax.convert import layouts
from vlm_jax.convert.checks import ConversionError, Tensors
from vlm_jax.models import unet as unet_model

# UNet2DConditionModel's defaults, for config.json files that leave keys out.
_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    dropout=0.0,
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1280,
    transformer_layers_per_block=1,
    attention_head_dim=8,
    num_attention_heads=None,
    use_linear_projection=False,
    class_embed_type=None,
    projection_class_embeddings_input_dim=None,
    time_embedding_dim=None,
    upcast_attention=False,
)
# Options whose other values we do not build: key -> the values that we do.
_FIXED: dict[str, tuple] = dict(
    center_input_sample=(False,),
    act_fn=("silu", "swish"),
    only_cross_attention=(False,),
    mid_block_only_cross_attention=(None, False),
    mid_block_scale_factor=(1, 1.0),
    resnet_out_scale_factor=(1, 1.0),
    dual_cross_attention=(False,),
    resnet_time_scale_shift=("default",),
    resnet_skip_time_act=(False,),
    time_embedding_type=("positional",),
    time_embedding_act_fn=(None,),
    timestep_post_act=(None,),
    time_cond_proj_dim=(None,),
    conv_in_kernel=(3,),
    conv_out_kernel=(3,),
    attention_type=("default",),
    class_embeddings_concat=(False,),
    cross_attention_norm=(None,),
    encoder_hid_dim=(None,),
    encoder_hid_dim_type=(None,),
    addition_embed_type=(None,),
    addition_time_embed_dim=(None,),
    num_class_embeds=(None,),
    reverse_transformer_layers_per_block=(None,),
)
# Keys without effect on what we build (addition_embed_type_num_heads: only with addition_embed_type).
_INERT = {"addition_embed_type_num_heads"}
_POOLED = {None: "", "projection": "mlp", "simple_projection": "linear"}
# Nothing in a UNet2DConditionModel checkpoint is left out.
IGNORED: tuple[str, ...] = ()
ARCHITECTURES = ("UNet2DConditionModel",)


def _ints(value: Any, n: int, key: str) -> tuple:
    """An int (or None) for each of n blocks, from an int or a list."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConversionError(f"{key} {list(value)} does not have one entry per block ({n})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ConversionError(f"{key} {list(value)}: nested per-layer lists are not supported")
        return tuple(value)
    return (value,) * n


def _check_supported(hf: dict[str, Any]) -> None:
    name = hf.get("_class_name", "UNet2DConditionModel")
    if name not in ARCHITECTURES:
        raise ConversionError(f"_class_name {name!r}: this converter reads {ARCHITECTURES}")
    for key, allowed in _FIXED.items():
        value = hf.get(key, allowed[0])
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise ConversionError(f"config.json sets {key}={value!r}; only {allowed} is supported here")
    known = set(_DEFAULTS) | set(_FIXED) | _INERT
    unknown = sorted(k for k in hf if not k.startswith("_") and k not in known and hf[k] not in (None, False))
    if unknown:
        raise ConversionError(f"config.json has options this converter does not know: {unknown}")
    if hf.get("class_embed_type") not in _POOLED:
        raise ConversionError(
            f"class_embed_type {hf['class_embed_type']!r} is not supported; "
            f"known: {[k for k in _POOLED if k]} (a pooled condition added to the time embedding) or null"
        )


def _level_heads(hf: dict[str, Any], n: int) -> tuple[int, ...]:
    """Heads per resolution level, from diffusers' rules: transformers (and so cross-attention
    blocks) take num_attention_heads, which defaults to attention_head_dim (a misnomer there);
    AttnDown/AttnUpBlock2D take attention_head_dim as the head width, the up blocks indexing it
    without reversing."""
    channels = tuple(hf["block_out_channels"])
    head_dim = _ints(hf["attention_head_dim"], n, "attention_head_dim")
    heads = _ints(hf["num_attention_heads"] or hf["attention_head_dim"], n, "num_attention_heads")

    def width_heads(c: int, d: int | None) -> int:
        d = c if d is None else d
        if c % d:
            raise ConversionError(f"{c} channels do not split into heads of width {d}")
        return c // d

    need: list[dict[str, int]] = [{} for _ in range(n)]
    for r, kind in enumerate(hf["down_block_types"]):
        if kind == "CrossAttnDownBlock2D":
            need[r][f"down block {r}"] = heads[r]
        elif kind == "AttnDownBlock2D":
            need[r][f"down block {r}"] = width_heads(channels[r], head_dim[r])
    for i, kind in enumerate(hf["up_block_types"]):
        r = n - 1 - i
        if kind == "CrossAttnUpBlock2D":
            need[r][f"up block {i}"] = heads[r]
        elif kind == "AttnUpBlock2D":
            need[r][f"up block {i}"] = width_heads(channels[r], head_dim[i])
    if hf["mid_block_type"] == "UNetMidBlock2DCrossAttn":
        need[n - 1]["mid block"] = heads[n - 1]
    out = []
    for r in range(n):
        values = set(need[r].values())
        if len(values) > 1:
            raise ConversionError(f"level {r} needs different head counts {need[r]}; one per level is built here")
        out.append(values.pop() if values else (heads[r] or 1))
    return tuple(int(h) for h in out)


def model_config(hf: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None) -> ml_collections.ConfigDict:
    """diffusers unet/config.json dict -> our "unet" model section (float32). `shapes` is unused
    (accepted for the from_hf converter signature)."""
    del shapes
    _check_supported(hf)
    hf = {**_DEFAULTS, **{k: v for k, v in hf.items() if not k.startswith("_")}}
    down, up = tuple(hf["down_block_types"]), tuple(hf["up_block_types"])
    n = len(hf["block_out_channels"])
    if len(down) != n or len(up) != n:
        raise ConversionError(f"{n} block_out_channels, {len(down)} down blocks and {len(up)} up blocks")
    for t in down:
        if t not in unet_model.DOWN_BLOCKS:
            raise ConversionError(f"down block type {t!r} is not built here; known: {sorted(unet_model.DOWN_BLOCKS)}")
    for t in up:
        if t not in unet_model.UP_BLOCKS:
            raise ConversionError(f"up block type {t!r} is not built here; known: {sorted(unet_model.UP_BLOCKS)}")
    mid = hf["mid_block_type"]
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
        raise ConversionError(f"mid_block_type {mid!r} is not built here")
    cross = hf["cross_attention_dim"]
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ConversionError(
                f"cross_attention_dim {list(cross)}: one context width for all blocks is built here"
            )
        cross = cross[0]
    if hf["norm_num_groups"] is None:
        raise ConversionError("norm_num_groups null (no output norm) is not supported")
    pooled = _POOLED[hf["class_embed_type"]]
    pooled_dim = 0
    if pooled:
        pooled_dim = hf["projection_class_embeddings_input_dim"]
        if not pooled_dim:
            raise ConversionError(
                f"class_embed_type {hf['class_embed_type']!r} needs projection_class_embeddings_input_dim"
            )
    layers = hf["layers_per_block"]
    depth = hf["transformer_layers_per_block"]
    sample = hf["sample_size"]
    cfg = dict(
        name="unet",
        in_channels=int(hf["in_channels"]),
        out_channels=int(hf["out_channels"]),
        block_out_channels=tuple(int(c) for c in hf["block_out_channels"]),
        layers_per_block=_ints(layers, n, "layers_per_block") if isinstance(layers, (list, tuple)) else int(layers),
        down_block_types=down,
        up_block_types=up,
        mid_block_type=mid or "",
        # diffusers builds UNet2DConditionModel's UNetMidBlock2D with num_layers=0: one resnet.
        mid_block_layers=1 if mid == "UNetMidBlock2DCrossAttn" else 0,
        num_attention_heads=_level_heads(hf, n),
        cross_attention_dim=int(cross),
        use_linear_projection=bool(hf["use_linear_projection"]),
        transformer_layers_per_block=_ints(depth, n, "transformer_layers_per_block")
        if isinstance(depth, (list, tuple)) else int(depth),
        norm_num_groups=int(hf["norm_num_groups"]),
        norm_eps=float(hf["norm_eps"]),
        flip_sin_to_cos=bool(hf["flip_sin_to_cos"]),
        freq_shift=float(hf["freq_shift"]),
        time_embed_dim=int(hf["time_embedding_dim"] or 0),
        downsample_padding=int(hf["downsample_padding"]),
        pooled_dim=int(pooled_dim),
        pooled_embed_type=pooled or "linear",
        dropout=float(hf["dropout"]),
        dtype="float32",
        attn_impl="auto",
        sample_size=tuple(sample) if isinstance(sample, (list, tuple)) else (sample or 0),
    )
    config = ml_collections.ConfigDict(cfg)
    try:
        unet_model.from_config(config)  # the model's own checks (groups, heads), as early as possible
    except ValueError as e:
        raise ConversionError(f"config.json describes a UNet that is not built here: {e}") from e
    return config


def _norm(t: Tensors, prefix: str) -> dict[str, np.ndarray]:
    return layouts.layer_norm(t, prefix)  # GroupNorm weight / bias -> scale / bias


def _attention(t: Tensors, prefix: str, heads: int, qkv_bias: bool) -> dict:
    return {
        "query": layouts.heads_in(t, f"{prefix}.to_q", heads, qkv_bias),
        "key": layouts.heads_in(t, f"{prefix}.to_k", heads, qkv_bias),
        "value": layouts.heads_in(t, f"{prefix}.to_v", heads, qkv_bias),
        "out": layouts.heads_out(t, f"{prefix}.to_out.0", heads),
    }


def _resnet(t: Tensors, prefix: str) -> dict:
    return layouts.resnet_block(t, prefix, time_embedding=True)


def _transformer(t: Tensors, prefix: str, heads: int, depth: int, linear: bool, cross: bool) -> dict:
    proj = layouts.linear if linear else layouts.conv
    out = {"norm": _norm(t, f"{prefix}.norm"), "proj_in": proj(t, f"{prefix}.proj_in")}
    for k in range(depth):
        p = f"{prefix}.transformer_blocks.{k}"
        block = {
            "norm1": layouts.layer_norm(t, f"{p}.norm1"),
            "attn1": _attention(t, f"{p}.attn1", heads, qkv_bias=False),
            "norm3": layouts.layer_norm(t, f"{p}.norm3"),
            "ff": {"proj": layouts.linear(t, f"{p}.ff.net.0.proj"), "out": layouts.linear(t, f"{p}.ff.net.2")},
        }
        if cross:
            block["norm2"] = layouts.layer_norm(t, f"{p}.norm2")
            block["attn2"] = _attention(t, f"{p}.attn2", heads, qkv_bias=False)
        out[f"transformer_blocks_{k}"] = block
    out["proj_out"] = proj(t, f"{prefix}.proj_out")
    return out


def _mix(t: Tensors, prefix: str, kind: str, heads: int, depth: int, model: unet_model.UNet) -> dict:
    if kind == "transformer":
        return _transformer(t, prefix, heads, depth, model.use_linear_projection, model.cross_attention_dim > 0)
    return {"group_norm": _norm(t, f"{prefix}.group_norm"), "attention": _attention(t, prefix, heads, True)}


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors -> our UNet param tree (the tree under "params")."""
    model = unet_model.from_config(cfg)
    n = len(model.block_out_channels)
    layers = unet_model.per_block(model.layers_per_block, n, "layers_per_block")
    depths = unet_model.per_block(model.transformer_layers_per_block, n, "transformer_layers_per_block")
    heads = model.heads
    out: dict[str, Any] = {
        "time_embedding": {
            "linear_1": layouts.linear(t, "time_embedding.linear_1"),
            "linear_2": layouts.linear(t, "time_embedding.linear_2"),
        },
        "conv_in": layouts.conv(t, "conv_in"),
    }
    if model.pooled_dim:
        if model.pooled_embed_type == "mlp":
            out["pooled_embedding"] = {
                "linear_1": layouts.linear(t, "class_embedding.linear_1"),
                "linear_2": layouts.linear(t, "class_embedding.linear_2"),
            }
        else:
            out["pooled_embedding"] = {"linear_1": layouts.linear(t, "class_embedding")}
    for i, block_type in enumerate(model.down_block_types):
        p, kind = f"down_blocks.{i}", unet_model.DOWN_BLOCKS[block_type]
        block: dict[str, Any] = {}
        for j in range(layers[i]):
            block[f"resnets_{j}"] = _resnet(t, f"{p}.resnets.{j}")
            if kind:
                block[f"attentions_{j}"] = _mix(t, f"{p}.attentions.{j}", kind, heads[i], depths[i], model)
        if i < n - 1:
            block["downsample"] = layouts.conv(t, f"{p}.downsamplers.0.conv")
        out[f"down_blocks_{i}"] = block
    if model.mid_block_type:
        kind = "transformer" if model.mid_block_type == "UNetMidBlock2DCrossAttn" else "attention"
        mid = {"resnets_0": _resnet(t, "mid_block.resnets.0")}
        for k in range(model.mid_block_layers):
            mid[f"attentions_{k}"] = _mix(t, f"mid_block.attentions.{k}", kind, heads[-1], depths[-1], model)
            mid[f"resnets_{k + 1}"] = _resnet(t, f"mid_block.resnets.{k + 1}")
        out["mid_block"] = mid
    for i, block_type in enumerate(model.up_block_types):
        r, p, kind = n - 1 - i, f"up_blocks.{i}", unet_model.UP_BLOCKS[block_type]
        block = {}
        for j in range(layers[r] + 1):
            block[f"resnets_{j}"] = _resnet(t, f"{p}.resnets.{j}")
            if kind:
                block[f"attentions_{j}"] = _mix(t, f"{p}.attentions.{j}", kind, heads[r], depths[r], model)
        if i < n - 1:
            block["upsample"] = layouts.conv(t, f"{p}.upsamplers.0.conv")
        out[f"up_blocks_{i}"] = block
    out["conv_norm_out"] = _norm(t, "conv_norm_out")
    out["conv_out"] = layouts.conv(t, "conv_out")
    return out


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[Any, ...]:
    """Inputs for tracing `init`: (x [1, S, S, in_channels], timesteps [1], context [1, 1, D] or
    None, pooled [1, P] or None), S the sample size rounded to what the blocks need."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    size = cfg.get("sample_size") or factor
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    h, w = -(-h // factor) * factor, -(-w // factor) * factor
    context = np.zeros((1, 1, cfg.cross_attention_dim), np.float32) if cfg.cross_attention_dim else None
    pooled = np.zeros((1, cfg.pooled_dim), np.float32) if cfg.get("pooled_dim", 0) else None
    return (np.zeros((1, h, w, cfg.in_channels), np.float32), np.zeros((1,), np.int32), context, pooled)
