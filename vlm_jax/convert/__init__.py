"""Weight import / export: `from_hf(path) -> (config, params)` for Hugging Face CLIPModel, ViTModel and
LlamaForCausalLM directories (config.json + safetensors, single or sharded), and
`to_hf(config, params, path)` for the families that have an exporter (LLaMA), and
`from_diffusers(folder)` for Stable Diffusion 1.x / 2.x pipeline folders (`convert.diffusers`). Pickled
checkpoints are never read."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from vlm_jax.convert import hf_clip, hf_llama, hf_vit
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params
from vlm_jax.convert.diffusers import from_diffusers, pipeline_config
from vlm_jax.convert.safetensors_io import read_safetensors

__all__ = ["ConversionError", "from_diffusers", "from_hf", "pipeline_config", "to_hf"]

# model_type -> (converter, family config file, the variant whose training settings we start from)
_FAMILIES = {
    "clip": (hf_clip, "clip", "b16"),
    "vit": (hf_vit, "vit", "b16"),
    "llama": (hf_llama, "llama", "llama2_7b"),
}
# config.model.name -> exporter module (with `to_hf(config, params, path)`)
_EXPORTERS = {"llama": hf_llama}
_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def _family_config(family: str, variant: str) -> ml_collections.ConfigDict:
    """The full config of configs/<family>.py:<variant> (its data, optimiser, evals settings)."""
    path = _CONFIGS_DIR / f"{family}.py"
    if not path.exists():
        raise ConversionError(f"family config {path} not found (run from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"vlm_jax_config_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ml_collections.ConfigDict(module.get_config(variant))


def _preprocessing(path: str) -> dict[str, Any]:
    """image_mean / image_std of preprocessor_config.json, when the directory has one."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        pre = json.load(f)
    return {k: tuple(pre[k]) for k in ("image_mean", "image_std") if k in pre}


def from_hf(
    path: str, *, dtype: str = "float32", scan_layers: bool = False
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """HF model directory -> (full config, params): `build(config).apply({"params": params}, ...)`.

    params is the tree under "params" (float32 numpy arrays); with scan_layers=True the encoder
    layers are stacked for nn.scan. Raises ConversionError on any weight that does not fit.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
        raise ConversionError(
            f"model_type {model_type!r} is not importable; known: {sorted(_FAMILIES)}"
        )
    converter, family, variant = _FAMILIES[model_type]
    archs = hf.get("architectures") or []
    if archs and not set(archs) & set(converter.ARCHITECTURES):
        raise ConversionError(
            f"architectures {archs}: {model_type} import reads {converter.ARCHITECTURES}"
        )

    raw = read_safetensors(path)
    if model_type == "vit":
        raw = hf_vit.canonical_names(raw)
    model_cfg = converter.model_config(hf, {k: v.shape for k, v in raw.items()})
    tensors = Tensors(raw, ignore=converter.IGNORED)
    params = converter.params(tensors, model_cfg)
    tensors.finish()

    params = finish_params(model_cfg, params, converter.dummy_inputs(model_cfg), dtype=dtype, scan_layers=scan_layers)

    config = _family_config(family, variant)
    config.model = model_cfg
    if model_type == "clip":
        config.data.image_size = model_cfg.image.image_size
        config.data.text_length = model_cfg.text.context_length
        config.tokenizer.vocab_size = model_cfg.text.vocab_size
    elif model_type == "llama":
        config.data.text_length = model_cfg.max_len
        config.tokenizer.vocab_size = model_cfg.vocab_size
    else:
        config.data.image_size = model_cfg.image_size
    pre = _preprocessing(path)
    if "image_mean" in pre:
        config.data.mean = pre["image_mean"]
    if "image_std" in pre:
        config.data.std = pre["image_std"]
    return config, params


def to_hf(config: ml_collections.ConfigDict, params: dict[str, Any], path: str) -> None:
    """Writes `params` (scanned or not) as a Hugging Face model directory that transformers loads.

    LoRA adapters in params are merged into their base weights first (alpha from the config).
    """
    from vlm_jax.layers import lora

    model_cfg = config.model if "model" in config else config
    name = model_cfg.name
    if name not in _EXPORTERS:
        raise ConversionError(f"no Hugging Face exporter for model {name!r}; known: {sorted(_EXPORTERS)}")
    params = jax.device_get(nn.unbox(params))
    if lora.has_adapters(params):
        params = jax.device_get(lora.merge(params, float((model_cfg.get("lora") or {}).get("alpha", 16.0))))
    _EXPORTERS[name].to_hf(config, params, path)
