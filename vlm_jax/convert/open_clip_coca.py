"""open_clip's CoCa (open_clip.CoCa: a model config dict such as its coca_ViT-B-32.json, and a
state_dict) -> our CoCa model section (configs/coca.py) and params.

The model section uses our CoCa's open_clip options (model.pooling = "open_clip", model.text.layout
= "open_clip"; see vlm_jax.models.coca), with which it computes open_clip's functions: encode_image /
encode_text are open_clip's encode_image / encode_text with normalize=False, and the caption logits
at position t are open_clip's forward(...)["logits"][:, t] (which stop one token earlier). The
open_clip package is not needed here: the state_dict may hold torch tensors or numpy arrays.

    import open_clip
    model = open_clip.create_model("coca_ViT-B-32")  # or open_clip.CoCa(embed_dim, ...)
    model_cfg, params = convert(model.state_dict(), open_clip.get_model_config("coca_ViT-B-32"))
    ours = vlm_jax.models.build(model_cfg)  # ours.apply({"params": params}, images_nhwc, tokens)

Only what open_clip's default CoCa builds is read: a ViT tower with `attentional_pool: true` (one
pooler, its first query the image embedding), the text tower with `embed_cls`, and no layer scale,
custom attention blocks, timm or Hugging Face towers; anything else raises ConversionError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.convert import layouts
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params

# open_clip's CLIPVisionCfg / CLIPTextCfg / MultimodalCfg defaults, for the keys a model config leaves out.
_VISION_DEFAULTS = dict(
    layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
    ls_init_value=None, attentional_pool=False, attn_pooler_queries=256, attn_pooler_heads=8,
    no_ln_pre=False, pos_embed_type="learnable", pool_type="tok", act_kwargs=None, norm_kwargs=None,
    block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
    scale_attn=False, scale_fc=False, timm_model_name=None,
)
_TEXT_DEFAULTS = dict(
    context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
    ls_init_value=None, embed_cls=False, pad_id=0, no_causal_mask=False, proj_bias=False,
    proj_type="linear", act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False,
    scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
    scale_fc=False, hf_model_name=None,
)
_MULTIMODAL_DEFAULTS = dict(_TEXT_DEFAULTS, heads=8)
_DECODER_MLP_RATIO = 4.0  # open_clip's _build_text_decoder_tower does not pass multimodal_cfg.mlp_ratio
# Settings our CoCa has no equivalent for: they must keep these values.
_FIXED = dict(
    ls_init_value=None, act_kwargs=None, block_type=(None, "default"), qk_norm=False,
    scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False,
    scale_fc=False,
)
_VISION_FIXED = dict(
    _FIXED, attentional_pool=True, no_ln_pre=False, pos_embed_type="learnable", pool_type="tok",
    timm_model_name=None,
)
_TEXT_FIXED = dict(
    _FIXED, embed_cls=True, no_causal_mask=False, proj_bias=False, proj_type="linear", hf_model_name=None,
)
# open_clip ResidualAttentionBlock suffixes, after _canonical split the fused q/k/v projections.
_BLOCK = dict(
    ln1="ln_1",
    query="attn.q_proj",
    key="attn.k_proj",
    value="attn.v_proj",
    out="attn.out_proj",
    ln2="ln_2",
    fc1="mlp.c_fc",
    fc2="mlp.c_proj",
)
# Buffers, not weights (open_clip registers them non-persistent; older exports may carry them).
IGNORED = (r"attn_mask$",)


def _section(oc: Mapping[str, Any], name: str, defaults: dict[str, Any], fixed: dict[str, Any]) -> dict:
    sec = {**defaults, **(oc.get(name) or {})}
    for key, want in fixed.items():
        allowed = want if isinstance(want, tuple) else (want,)
        if sec.get(key) not in allowed:
            raise ConversionError(
                f"open_clip {name}.{key}={sec.get(key)!r} has no equivalent in our CoCa (supported: {want!r})"
            )
    # open_clip's attentional pooler and multimodal decoder ignore norm_kwargs (torch's eps 1e-5),
    # the towers around them don't: only 1e-5 gives one eps per tower, as ours has.
    norm = sec.get("norm_kwargs") or {}
    if set(norm) - {"eps"} or float(norm.get("eps", 1e-5)) != 1e-5:
        raise ConversionError(f"open_clip {name}.norm_kwargs {norm}: only LayerNorm eps 1e-5 is supported")
    return sec


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"open_clip {what} {value}: only square sizes are supported")
        value = value[0]
    return int(value)


def model_config(
    oc: Mapping[str, Any], *, quick_gelu: bool | None = None, eos_id: int | None = None
) -> ml_collections.ConfigDict:
    """An open_clip CoCa model config dict (embed_dim, vision_cfg, text_cfg, multimodal_cfg[,
    quick_gelu]) -> the model section of configs/coca.py that computes the same functions.

    quick_gelu: overrides the dict's (open_clip's create_model(..., force_quick_gelu=True)).
    eos_id: our config's end-of-text id; default vocab_size - 1 (open_clip's tokenizer's last id).
    """
    if "embed_dim" not in oc:
        raise ConversionError("the open_clip model config has no embed_dim")
    embed_dim = int(oc["embed_dim"])
    v = _section(oc, "vision_cfg", _VISION_DEFAULTS, _VISION_FIXED)
    t = _section(oc, "text_cfg", _TEXT_DEFAULTS, _TEXT_FIXED)
    m = _section(oc, "multimodal_cfg", _MULTIMODAL_DEFAULTS, _FIXED)
    if isinstance(v["layers"], (list, tuple)):
        raise ConversionError("a ResNet image tower (vision_cfg.layers a list) is not a CoCa we read")
    # One width, head count and MLP width for the text decoder: open_clip's towers must agree where
    # ours share. Its multimodal tower ignores multimodal_cfg.mlp_ratio (MultimodalTransformer's 4).
    for key in ("width", "heads"):
        if float(t[key]) != float(m[key]):
            raise ConversionError(
                f"text_cfg.{key}={t[key]} differs from multimodal_cfg.{key}={m[key]}; our decoder shares one"
            )
    if float(t["mlp_ratio"]) != _DECODER_MLP_RATIO:
        raise ConversionError(
            f"text_cfg.mlp_ratio={t['mlp_ratio']}: open_clip's multimodal layers always have mlp_ratio "
            f"{_DECODER_MLP_RATIO}, and our decoder shares one"
        )
    if int(m["width"]) != embed_dim:
        # open_clip's cross-attention reads the pooler's embed_dim-wide tokens at the decoder width.
        raise ConversionError(f"multimodal_cfg.width {m['width']} must equal embed_dim {embed_dim}")
    if int(m["context_length"]) < int(t["context_length"]) - 1:
        raise ConversionError(
            f"multimodal_cfg.context_length {m['context_length']} is shorter than the "
            f"{int(t['context_length']) - 1} tokens the decoder reads"
        )
    queries = int(v["attn_pooler_queries"])
    if queries < 2:
        raise ConversionError(f"attn_pooler_queries={queries}: CoCa needs 1 + at least 1 captioning query")
    width = int(v["width"])
    if width % int(v["head_width"]):
        raise ConversionError(f"vision width {width} is not a multiple of head_width {v['head_width']}")
    quick = bool(oc.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
    act = "quick_gelu" if quick else "gelu"  # open_clip: QuickGELU or torch's exact (erf) nn.GELU
    vocab = int(t["vocab_size"])
    return ml_collections.ConfigDict(
        dict(
            name="coca",
            embed_dim=embed_dim,
            pooling="open_clip",
            image=dict(
                image_size=_square(v["image_size"], "image_size"),
                patch_size=_square(v["patch_size"], "patch_size"),
                width=width,
                depth=int(v["layers"]),
                heads=width // int(v["head_width"]),
                mlp_ratio=float(v["mlp_ratio"]),
                act=act,
                ln_eps=1e-5,
                pre_norm=True,  # ln_pre
                patch_bias=False,  # conv1 has no bias
            ),
            text=dict(
                vocab_size=vocab,
                context_length=int(t["context_length"]),
                width=int(t["width"]),
                unimodal_depth=int(t["layers"]),
                multimodal_depth=int(m["layers"]),
                heads=int(t["heads"]),
                mlp_ratio=float(t["mlp_ratio"]),
                act=act,
                ln_eps=1e-5,
                pad_id=int(t["pad_id"]),
                eos_id=vocab - 1 if eos_id is None else int(eos_id),
                layout="open_clip",
            ),
            caption_queries=queries - 1,
            pooler_heads=int(v["attn_pooler_heads"]),
            logit_scale_init=float(oc.get("init_logit_scale", math.log(1 / 0.07))),
            logit_scale_max=math.log(100.0),
            dtype="float32",
            scan_layers=False,
            remat="none",
        )
    )


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _canonical(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy arrays, with nn.MultiheadAttention's fused in_proj_weight/bias [3D, ...] (or its
    separate q/k/v_proj_weight when kdim differs) as <attn>.q_proj/k_proj/v_proj.weight/.bias."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        x = _numpy(value)
        prefix, _, name = key.rpartition(".")
        if name in ("in_proj_weight", "in_proj_bias"):
            if x.shape[0] % 3:
                raise ConversionError(f"{key} {x.shape}: not three stacked projections")
            kind = "weight" if name == "in_proj_weight" else "bias"
            for part, y in zip(("q", "k", "v"), np.split(x, 3, axis=0)):
                out[f"{prefix}.{part}_proj.{kind}"] = y
        elif name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            out[f"{prefix}.{name[0]}_proj.weight"] = x
        else:
            out[key] = x
    return out


def _attention(t: Tensors, prefix: str, heads: int) -> dict:
    return {
        "query": layouts.heads_in(t, f"{prefix}.q_proj", heads),
        "key": layouts.heads_in(t, f"{prefix}.k_proj", heads),
        "value": layouts.heads_in(t, f"{prefix}.v_proj", heads),
        "out": layouts.heads_out(t, f"{prefix}.out_proj", heads),
    }


def _mlp(t: Tensors, prefix: str) -> dict:
    return {"fc1": layouts.linear(t, f"{prefix}.c_fc"), "fc2": layouts.linear(t, f"{prefix}.c_proj")}


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors (after _canonical) -> our CoCa param tree (unscanned layers)."""
    vi, tx = cfg.image, cfg.text
    block = lambda prefix, heads: layouts.encoder_block(t, prefix, _BLOCK, heads)  # noqa: E731
    image = {
        "patch_embed": layouts.conv(t, "visual.conv1", bias=False),
        "cls_token": t.take("visual.class_embedding"),
        "pos_embed": {"pos_embedding": t.take("visual.positional_embedding")},
        "ln_pre": layouts.layer_norm(t, "visual.ln_pre"),
        "encoder": {
            f"layers_{i}": block(f"visual.transformer.resblocks.{i}", vi.heads) for i in range(vi.depth)
        },
    }
    pooler = {
        "queries": t.take("visual.attn_pool.query"),
        "ln_queries": layouts.layer_norm(t, "visual.attn_pool.ln_q"),
        "ln_context": layouts.layer_norm(t, "visual.attn_pool.ln_k"),
        "attn": _attention(t, "visual.attn_pool.attn", cfg.pooler_heads),
        "ln_out": layouts.layer_norm(t, "visual.ln_post"),
    }
    multimodal = {}
    for i in range(tx.multimodal_depth):
        layer = block(f"text_decoder.resblocks.{i}", tx.heads)
        cross = f"text_decoder.cross_attn.{i}"
        layer.update(
            ln_cross=layouts.layer_norm(t, f"{cross}.ln_1"),
            ln_context=layouts.layer_norm(t, f"{cross}.ln_1_kv"),
            cross_attn=_attention(t, f"{cross}.attn", tx.heads),
            ln_cross_mlp=layouts.layer_norm(t, f"{cross}.ln_2"),
            cross_mlp=_mlp(t, f"{cross}.mlp"),
        )
        multimodal[f"layers_{i}"] = layer
    if "logit_bias" in t:
        raise ConversionError("a CoCa with logit_bias (init_logit_bias) has no equivalent here")
    return {
        "image": image,
        "pooler": pooler,
        "image_projection": {"kernel": t.take("visual.proj")},  # x @ proj: already [in, out]
        "token_embedding": {"embedding": t.take("text.token_embedding.weight")},
        "text_pos_embedding": t.take("text.positional_embedding"),
        "cls_token": t.take("text.cls_emb"),
        "unimodal": {
            f"layers_{i}": block(f"text.transformer.resblocks.{i}", tx.heads) for i in range(tx.unimodal_depth)
        },
        "ln_cls": layouts.layer_norm(t, "text.ln_final"),
        "text_projection": {"kernel": t.take("text.text_projection")},
        "multimodal": multimodal,
        "ln_final": layouts.layer_norm(t, "text_decoder.ln_final"),
        "lm_head": {"kernel": t.take("text_decoder.text_projection")},
        "logit_scale": t.take("logit_scale").reshape(()),
    }


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Inputs for tracing `init`: images [1, S, S, 3] and tokens [1, context_length]."""
    size = cfg.image.image_size
    return np.zeros((1, size, size, 3), np.float32), np.zeros((1, cfg.text.context_length), np.int32)


def convert(
    state_dict: Mapping[str, Any],
    oc_config: Mapping[str, Any],
    *,
    quick_gelu: bool | None = None,
    dtype: str = "float32",
    scan_layers: bool = False,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """open_clip CoCa state_dict + its model config dict -> (our model section, params).

    Every checkpoint tensor must find its place and the params must match the model's own tree
    (ConversionError otherwise); with scan_layers=True the layers are stacked for nn.scan.
    """
    cfg = model_config(oc_config, quick_gelu=quick_gelu)
    tensors = Tensors(_canonical(state_dict), ignore=IGNORED)
    out = params(tensors, cfg)
    tensors.finish()
    return cfg, finish_params(cfg, out, dummy_inputs(cfg), dtype=dtype, scan_layers=scan_layers)
