"""Torch layouts -> ours: nn.Linear [out, in] -> kernel [in, out]; attention projections split into
heads; Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; LayerNorm weight -> scale. Each takes the
checkpoint (`Tensors`) and a key prefix and returns the param subtree of one of our layers."""

from __future__ import annotations

import numpy as np

from vlm_jax.convert.checks import ConversionError, Tensors


def _reshape(key: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.size != int(np.prod(shape)):
        raise ConversionError(f"weight {key!r} of shape {x.shape} cannot be laid out as {shape}")
    return x.reshape(shape)


def linear(t: Tensors, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """{prefix}.weight [out, in] (+ .bias) -> {kernel [in, out], bias [out]}."""
    out = {"kernel": t.take(f"{prefix}.weight").T}
    if bias:
        out["bias"] = t.take(f"{prefix}.bias")
    return out


def layer_norm(t: Tensors, prefix: str) -> dict[str, np.ndarray]:
    """{prefix}.weight/.bias [E] -> {scale, bias}."""
    return {"scale": t.take(f"{prefix}.weight"), "bias": t.take(f"{prefix}.bias")}


def heads_in(t: Tensors, prefix: str, heads: int, bias: bool = True) -> dict[str, np.ndarray]:
    """q/k/v Linear [H*D, E] -> {kernel [E, H, D], bias [H, D]}."""
    key = f"{prefix}.weight"
    w = t.take(key)
    if w.shape[0] % heads:
        raise ConversionError(
            f"weight {key!r} {w.shape}: {w.shape[0]} is not divisible by {heads} heads"
        )
    d = w.shape[0] // heads
    out = {"kernel": _reshape(key, w.T, (w.shape[1], heads, d))}
    if bias:
        out["bias"] = _reshape(f"{prefix}.bias", t.take(f"{prefix}.bias"), (heads, d))
    return out


def heads_out(t: Tensors, prefix: str, heads: int, bias: bool = True) -> dict[str, np.ndarray]:
    """Output Linear [E_out, H*D] -> {kernel [H, D, E_out], bias [E_out]}."""
    key = f"{prefix}.weight"
    w = t.take(key)
    if w.shape[1] % heads:
        raise ConversionError(
            f"weight {key!r} {w.shape}: {w.shape[1]} is not divisible by {heads} heads"
        )
    out = {"kernel": _reshape(key, w.T, (heads, w.shape[1] // heads, w.shape[0]))}
    if bias:
        out["bias"] = t.take(f"{prefix}.bias")
    return out


def conv(t: Tensors, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """Conv2d weight [O, I, kh, kw] (+ bias [O]) -> {kernel [kh, kw, I, O], bias [O]}."""
    w = t.take(f"{prefix}.weight")
    if w.ndim != 4:
        raise ConversionError(f"weight {prefix + '.weight'!r} {w.shape} is not a Conv2d kernel")
    out = {"kernel": w.transpose(2, 3, 1, 0)}
    if bias:
        out["bias"] = t.take(f"{prefix}.bias")
    return out


def encoder_block(
    t: Tensors, prefix: str, names: dict[str, str], heads: int, qkv_bias: bool = True
) -> dict:
    """One pre-norm block -> our EncoderBlock subtree; `names` maps our parts to the HF suffixes
    (ln1, query, key, value, out, ln2, fc1, fc2)."""
    p = lambda part: f"{prefix}.{names[part]}"  # noqa: E731
    return {
        "ln1": layer_norm(t, p("ln1")),
        "attn": {
            "query": heads_in(t, p("query"), heads, qkv_bias),
            "key": heads_in(t, p("key"), heads, qkv_bias),
            "value": heads_in(t, p("value"), heads, qkv_bias),
            "out": heads_out(t, p("out"), heads),
        },
        "ln2": layer_norm(t, p("ln2")),
        "mlp": {"fc1": linear(t, p("fc1")), "fc2": linear(t, p("fc2"))},
    }


def resnet_block(t: Tensors, prefix: str, time_embedding: bool) -> dict:
    """diffusers' ResnetBlock2D -> models.diffusion.blocks.ResnetBlock: norm1, conv1, (time_emb_proj),
    norm2, conv2 and, when the checkpoint has one, the 1x1 conv_shortcut."""
    out = {"norm1": layer_norm(t, f"{prefix}.norm1"), "conv1": conv(t, f"{prefix}.conv1")}
    if time_embedding:
        out["time_emb_proj"] = linear(t, f"{prefix}.time_emb_proj")
    out.update(norm2=layer_norm(t, f"{prefix}.norm2"), conv2=conv(t, f"{prefix}.conv2"))
    if f"{prefix}.conv_shortcut.weight" in t:  # the model's own tree decides whether it belongs
        out["conv_shortcut"] = conv(t, f"{prefix}.conv_shortcut")
    return out

