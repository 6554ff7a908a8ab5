"""diffusers AutoencoderKL (a Stable Diffusion folder's `vae/`: config.json + safetensors) -> our
`autoencoder_kl` model section and params.

Mid-block attention weights come under either name set: `to_q/to_k/to_v/to_out.0` (diffusers >= 0.14)
or `query/key/value/proj_attn` (older exports), as Linear [C, C] or as 1x1 Conv2d [C, C, 1, 1]
weights (checkpoints converted from the original latent-diffusion code).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlm_jax.convert import layouts
from vlm_jax.convert.checks import ConversionError, Tensors
from vlm_jax.models import autoencoder_kl

CLASS_NAMES = ("AutoencoderKL",)
IGNORED: tuple[str, ...] = ()
# diffusers' AutoencoderKL defaults, for config.json files that leave keys out.
_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
_ACTS = ("silu", "swish")  # diffusers maps both to SiLU
# Mid-block attention parts: ours -> (current diffusers name, old name).
_ATTN_NAMES = dict(query=("to_q", "query"), key=("to_k", "key"), value=("to_v", "value"), out=("to_out.0", "proj_attn"))


def model_config(hf: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None) -> ml_collections.ConfigDict:
    """diffusers AutoencoderKL config.json dict -> model section of `vlm_jax.models.autoencoder_kl`
    (float32). `shapes` (tensor name -> shape) is accepted for from_hf's calling convention, unused."""
    del shapes
    cls = hf.get("_class_name", "AutoencoderKL")
    if cls not in CLASS_NAMES:
        raise ConversionError(f"diffusers VAE class {cls!r} is not supported; known: {CLASS_NAMES}")
    c = {**_DEFAULTS, **{k: v for k, v in hf.items() if not k.startswith("_")}}
    if c["act_fn"] not in _ACTS:
        raise ConversionError(f"act_fn {c['act_fn']!r} is not supported; the VAE uses SiLU ({_ACTS})")
    sample_size = c.get("sample_size", 0)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    section = dict(
        name="autoencoder_kl",
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]),
        block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        norm_num_groups=int(c["norm_num_groups"]),
        down_block_types=tuple(c["down_block_types"]),
        up_block_types=tuple(c["up_block_types"]),
        mid_block_add_attention=bool(c["mid_block_add_attention"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=float(c["shift_factor"] or 0.0),
        sample_size=int(sample_size or 0),  # the image side it was trained at (informational)
        dtype="float32",
        attn_impl="auto",
        scan_layers=False,
    )
    for key in ("latents_mean", "latents_std"):  # per-channel latent statistics some VAEs ship
        if c[key] is not None:
            section[key] = tuple(float(x) for x in c[key])
    try:
        autoencoder_kl.check_config(
            section["block_out_channels"], section["down_block_types"], section["up_block_types"],
            section["layers_per_block"], section["norm_num_groups"], section["latent_channels"],
        )
    except ValueError as e:
        raise ConversionError(str(e)) from e
    return ml_collections.ConfigDict(section)


def _resnet(t: Tensors, prefix: str) -> dict:
    return layouts.resnet_block(t, prefix, time_embedding=False)


def _matrix(t: Tensors, key: str) -> np.ndarray:
    """A Linear weight [O, I] or a 1x1 Conv2d weight [O, I, 1, 1] -> [O, I]."""
    w = t.take(key)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ConversionError(f"weight {key!r} {w.shape} is neither a Linear nor a 1x1 Conv2d weight")
    return w


def _attention(t: Tensors, prefix: str) -> dict:
    """Single-head mid-block attention -> {group_norm, attention {query, key, value, out}} (the shared
    AttentionBlock with one head of width C)."""
    new = f"{prefix}.to_q.weight" in t
    attention: dict[str, Any] = {}
    for ours, names in _ATTN_NAMES.items():
        p = f"{prefix}.{names[0] if new else names[1]}"
        w = _matrix(t, f"{p}.weight")  # [C_out, C_in]
        b = t.take(f"{p}.bias")
        if ours == "out":
            attention[ours] = {"kernel": w.T.reshape(1, w.shape[1], w.shape[0]), "bias": b}
        else:
            attention[ours] = {"kernel": w.T.reshape(w.shape[1], 1, w.shape[0]), "bias": b.reshape(1, -1)}
    return {"group_norm": layouts.layer_norm(t, f"{prefix}.group_norm"), "attention": attention}


def _mid(t: Tensors, prefix: str, attention: bool) -> dict:
    out = {"resnets_0": _resnet(t, f"{prefix}.resnets.0"), "resnets_1": _resnet(t, f"{prefix}.resnets.1")}
    if attention:
        out["attentions_0"] = _attention(t, f"{prefix}.attentions.0")
    return out


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors -> our AutoencoderKL param tree."""
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    attn = cfg.mid_block_add_attention
    encoder: dict[str, Any] = {"conv_in": layouts.conv(t, "encoder.conv_in")}
    for i in range(n):
        p = f"encoder.down_blocks.{i}"
        block = {f"resnets_{j}": _resnet(t, f"{p}.resnets.{j}") for j in range(layers)}
        if i < n - 1:
            block["downsample"] = layouts.conv(t, f"{p}.downsamplers.0.conv")
        encoder[f"down_blocks_{i}"] = block
    encoder["mid_block"] = _mid(t, "encoder.mid_block", attn)
    encoder["conv_norm_out"] = layouts.layer_norm(t, "encoder.conv_norm_out")
    encoder["conv_out"] = layouts.conv(t, "encoder.conv_out")

    decoder: dict[str, Any] = {
        "conv_in": layouts.conv(t, "decoder.conv_in"),
        "mid_block": _mid(t, "decoder.mid_block", attn),
    }
    for i in range(n):
        p = f"decoder.up_blocks.{i}"
        block = {f"resnets_{j}": _resnet(t, f"{p}.resnets.{j}") for j in range(layers + 1)}
        if i < n - 1:
            block["upsample"] = layouts.conv(t, f"{p}.upsamplers.0.conv")
        decoder[f"up_blocks_{i}"] = block
    decoder["conv_norm_out"] = layouts.layer_norm(t, "decoder.conv_norm_out")
    decoder["conv_out"] = layouts.conv(t, "decoder.conv_out")

    out = {"encoder": encoder, "decoder": decoder}
    if cfg.use_quant_conv:
        out["quant_conv"] = layouts.conv(t, "quant_conv")
    if cfg.use_post_quant_conv:
        out["post_quant_conv"] = layouts.conv(t, "post_quant_conv")
    return out


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, ...]:
    """Inputs for tracing `init` (its __call__ creates the encoder's and the decoder's params):
    images [1, f, f, in_channels], f the downsampling factor."""
    f = 2 ** (len(cfg.block_out_channels) - 1)
    return (np.zeros((1, f, f, cfg.in_channels), np.float32),)
