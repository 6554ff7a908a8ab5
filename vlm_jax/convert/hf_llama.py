"""Hugging Face LlamaForCausalLM (config.json + safetensors) <-> our LLaMA config section and params.

HF stores q_proj / k_proj rows already permuted for its half-split ("rotate_half") rotary layout,
which is the layout of `layers.embeddings.rope`, so the projections load without permutation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from vlm_jax.convert.checks import ConversionError, Tensors
from vlm_jax.layers.transformer import unstack_layers

# LlamaConfig defaults, for config.json files that leave keys out.
_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
# Non-persistent buffers that older exports wrote out.
IGNORED = (r"rotary_emb\.inv_freq$",)
ARCHITECTURES = ("LlamaForCausalLM",)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """rope theta of a config.json: `rope_theta`, or transformers 5's `rope_parameters`."""
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rp
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in (None, "default"):
        raise ConversionError(f"rope scaling {kind!r} is not supported (only plain rotary embeddings)")
    return float(rp.get("rope_theta") or hf.get("rope_theta") or _DEFAULTS["rope_theta"])


def model_config(hf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> ml_collections.ConfigDict:
    """HF LlamaConfig dict -> model section of configs/llama.py (float32, unscanned)."""
    c = {**_DEFAULTS, **hf}
    if c["hidden_act"] != "silu":
        raise ConversionError(f"hidden_act {c['hidden_act']!r}: LLaMA's SwiGLU MLP here uses silu")
    if c["attention_bias"] or c["mlp_bias"]:
        raise ConversionError("attention_bias / mlp_bias checkpoints are not supported")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    # A checkpoint without lm_head.weight shares the embedding, whatever its config says.
    tied = bool(c["tie_word_embeddings"]) or "lm_head.weight" not in shapes
    return ml_collections.ConfigDict(
        dict(
            name="llama",
            vocab_size=c["vocab_size"],
            width=c["hidden_size"],
            depth=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=0 if head_dim * heads == c["hidden_size"] else head_dim,
            mlp_dim=c["intermediate_size"],
            norm_eps=float(c["rms_norm_eps"]),
            rope_theta=_rope_theta(hf),
            max_len=c["max_position_embeddings"],
            tie_embeddings=tied,
            dtype="float32",
            scan_layers=False,
            remat="none",
            attn_impl="auto",
        )
    )


def _head_dim(cfg: ml_collections.ConfigDict) -> int:
    return cfg.head_dim or cfg.width // cfg.heads


def params(t: Tensors, cfg: ml_collections.ConfigDict) -> dict:
    """Checkpoint tensors -> our Llama param tree (unscanned layers)."""
    e, d = cfg.width, _head_dim(cfg)

    def heads_in(name: str, n: int) -> dict:  # torch [n * d, E] -> [E, n, d]
        return {"kernel": t.take(f"{name}.weight").T.reshape(e, n, d)}

    def linear(name: str) -> dict:  # torch [out, in] -> [in, out]
        return {"kernel": t.take(f"{name}.weight").T}

    out: dict[str, Any] = {"embed": {"embedding": t.take("model.embed_tokens.weight")}}
    for i in range(cfg.depth):
        p = f"model.layers.{i}"
        out[f"layers_{i}"] = {
            "attn_norm": {"scale": t.take(f"{p}.input_layernorm.weight")},
            "attn": {
                "query": heads_in(f"{p}.self_attn.q_proj", cfg.heads),
                "key": heads_in(f"{p}.self_attn.k_proj", cfg.kv_heads),
                "value": heads_in(f"{p}.self_attn.v_proj", cfg.kv_heads),
                "out": {"kernel": t.take(f"{p}.self_attn.o_proj.weight").T.reshape(cfg.heads, d, e)},
            },
            "mlp_norm": {"scale": t.take(f"{p}.post_attention_layernorm.weight")},
            "mlp": {k: linear(f"{p}.mlp.{k}_proj") for k in ("gate", "up", "down")},
        }
    out["final_norm"] = {"scale": t.take("model.norm.weight")}
    if cfg.tie_embeddings:
        if "lm_head.weight" in t:
            head = t.take("lm_head.weight")
            if not np.array_equal(head, out["embed"]["embedding"]):
                raise ConversionError("tie_word_embeddings is set but lm_head.weight differs from the embedding")
    else:
        out["lm_head"] = linear("lm_head")
    return out


def dummy_inputs(cfg: ml_collections.ConfigDict) -> tuple[jnp.ndarray, ...]:
    """Inputs for tracing `init`: tokens [1, 1]."""
    del cfg
    return (np.zeros((1, 1), np.int32),)


def hf_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Our model section -> a config.json dict that transformers' LlamaConfig reads."""
    head_dim = _head_dim(cfg)
    return dict(
        architectures=list(ARCHITECTURES),
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        # transformers >= 5 reads rope settings from here; older versions read rope_theta.
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        rope_scaling=None,
        tie_word_embeddings=bool(cfg.tie_embeddings),
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype="float32",
        dtype="float32",
    )


def to_hf(config: ml_collections.ConfigDict, params: Mapping[str, Any], path: str) -> None:
    """Writes config.json + model.safetensors (float32) of our Llama params for transformers."""
    cfg = config.model if "model" in config else config
    if "layers" in params:  # scanned
        params = unstack_layers(params)
    e, d = cfg.width, _head_dim(cfg)
    arr = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))  # noqa: E731
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": arr(params["embed"]["embedding"])}
    for i in range(cfg.depth):
        p, layer = f"model.layers.{i}", params[f"layers_{i}"]
        a = layer["attn"]
        w[f"{p}.input_layernorm.weight"] = arr(layer["attn_norm"]["scale"])
        for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            kernel = np.asarray(a[ours]["kernel"])
            w[f"{p}.self_attn.{theirs}_proj.weight"] = arr(kernel.reshape(e, -1).T)
        w[f"{p}.self_attn.o_proj.weight"] = arr(np.asarray(a["out"]["kernel"]).reshape(cfg.heads * d, e).T)
        w[f"{p}.post_attention_layernorm.weight"] = arr(layer["mlp_norm"]["scale"])
        for k in ("gate", "up", "down"):
            w[f"{p}.mlp.{k}_proj.weight"] = arr(np.asarray(layer["mlp"][k]["kernel"]).T)
    w["model.norm.weight"] = arr(params["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = arr(np.asarray(params["lm_head"]["kernel"]).T)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
