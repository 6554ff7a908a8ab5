"""A diffusers pipeline folder of the Stable Diffusion 1.x / 2.x layout -> our models.

    parts = from_diffusers("stable-diffusion-v1-5/")
    unet_cfg, unet_params = parts["unet"]          # models.unet
    vae_cfg, vae_params = parts["vae"]             # models.autoencoder_kl
    text_cfg, text_params = parts["text_encoder"]  # models.text (CLIP's text tower)
    parts["scheduler"]                             # scheduler_config.json, as a ConfigDict

The folder: `model_index.json` names each part's class; `unet/`, `vae/` and `text_encoder/` hold a
config.json and safetensors weights (pickled .bin files are never read); `scheduler/` holds
scheduler_config.json. Each model is built by `vlm_jax.models.build(config)`. Anything else (another
part class, a missing folder or file, weights that do not fit) is a ConversionError naming it.

`pipeline_config(parts)` assembles them into one `text_diffusion` run config (models.text_diffusion:
latent diffusion on the UNet, the VAE and the text encoder, with the scheduler's noise schedule in
the `diffusion` task section), which `vlm-jax convert --from-diffusers` writes beside the params
so that `vlm-jax sample` runs the whole text-to-image pipeline.
"""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Any

import ml_collections

from vlm_jax.convert import diffusers_unet, diffusers_vae, hf_clip_text
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params
from vlm_jax.convert.safetensors_io import read_safetensors

# part -> (the classes we read, converter)
PARTS: dict[str, tuple[tuple[str, ...], ModuleType]] = {
    "unet": (("UNet2DConditionModel",), diffusers_unet),
    "vae": (("AutoencoderKL",), diffusers_vae),
    "text_encoder": (("CLIPTextModel",), hf_clip_text),
}
# diffusers' beta_schedule -> ours (models.diffusion.schedules)
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConversionError(f"{what}: {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{what}: {path} is not valid JSON ({e})") from e


def _part(folder: str, part: str, index: dict[str, Any], *, dtype: str, variant: str | None):
    classes, converter = PARTS[part]
    entry = index.get(part)
    if not entry or not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise ConversionError(f"model_index.json names no {part!r} part (expected [library, class])")
    if entry[1] not in classes:
        raise ConversionError(f"model_index.json: {part} is a {entry[1]}; the import reads {', '.join(classes)}")
    path = os.path.join(folder, part)
    hf = _json(os.path.join(path, "config.json"), part)
    try:
        raw = read_safetensors(path, variant)
    except FileNotFoundError as e:
        raise ConversionError(f"{part}: {e}") from e
    try:
        model_cfg = converter.model_config(hf, {k: v.shape for k, v in raw.items()})
        tensors = Tensors(raw, ignore=converter.IGNORED)
        params = converter.params(tensors, model_cfg)
        tensors.finish()
        params = finish_params(model_cfg, params, converter.dummy_inputs(model_cfg), dtype=dtype, scan_layers=False)
    except ConversionError as e:
        raise ConversionError(f"{part}: {e}") from e
    return model_cfg, params


def from_diffusers(folder: str, *, dtype: str = "float32", variant: str | None = None) -> dict[str, Any]:
    """A diffusers folder -> {'unet': (config, params), 'vae': ..., 'text_encoder': ..., 'scheduler':
    ConfigDict}; params are float32 numpy trees (the `params` collection), `dtype` the models'
    compute dtype; `variant` reads e.g. the fp16 weight files (still converted to float32)."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is not a directory")
    index = _json(os.path.join(folder, "model_index.json"), "not a diffusers pipeline folder")
    out: dict[str, Any] = {part: _part(folder, part, index, dtype=dtype, variant=variant) for part in PARTS}
    if not index.get("scheduler"):
        raise ConversionError("model_index.json names no 'scheduler' part")
    out["scheduler"] = ml_collections.ConfigDict(
        _json(os.path.join(folder, "scheduler", "scheduler_config.json"), "scheduler"))
    return out


def scheduler_task(scheduler: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A diffusers scheduler config -> our `diffusion` task section (tasks.diffusion): its noise
    schedule and prediction type, DDIM sampling with its timestep spacing settings."""
    beta = scheduler.get("beta_schedule", "linear")
    if beta not in _BETA_SCHEDULES:
        raise ConversionError(f"scheduler: beta_schedule {beta!r} is not supported; known: {sorted(_BETA_SCHEDULES)}")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ConversionError(f"scheduler: prediction_type {prediction!r}; known: {_PREDICTIONS}")
    if scheduler.get("trained_betas"):
        raise ConversionError("scheduler: explicit trained_betas are not supported")
    return ml_collections.ConfigDict(dict(
        name="diffusion", schedule=_BETA_SCHEDULES[beta], num_train_steps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_start=float(scheduler.get("beta_start", 1e-4)), beta_end=float(scheduler.get("beta_end", 0.02)),
        prediction=prediction, min_snr_gamma=0.0, cond_drop=0.0, sampler="ddim", sample_steps=50, eta=0.0,
        guidance=7.5, clip_sample=0.0, spacing=str(scheduler.get("timestep_spacing", "leading")),
        steps_offset=int(scheduler.get("steps_offset", 0)), prev_rule="diffusers",
        set_alpha_to_one=bool(scheduler.get("set_alpha_to_one", False)),
    ))


def pipeline_config(parts: dict[str, Any], tokenizer: Any = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """from_diffusers' parts -> (a `text_diffusion` run config, its params {unet, text, autoencoder}):
    latent diffusion at the VAE's scaling factor, the text encoder's last hidden states as the
    cross-attention context (no pooled embedding), and the scheduler's settings. With the folder's
    tokenizer (anything with tokenize(texts, length), e.g. data.clip_bpe.ClipTokenizer), guidance's
    unconditional caption is the empty prompt as it writes it (task.null_tokens: [bos, eos, pad,
    ...], diffusers' negative prompt ""), not a row of id 0."""
    from vlm_jax.config_defaults import base_config, default_mesh_and_rules

    (unet_cfg, unet_params), (vae_cfg, vae_params) = parts["unet"], parts["vae"]
    text_cfg, text_params = parts["text_encoder"]
    if int(unet_cfg.get("cross_attention_dim", 0)) != int(text_cfg.width):
        raise ConversionError(f"the unet cross-attends to width {unet_cfg.cross_attention_dim}, the text encoder "
                              f"gives {text_cfg.width}")
    if int(unet_cfg.in_channels) != int(vae_cfg.latent_channels):
        raise ConversionError(f"the unet reads {unet_cfg.in_channels} channels, the vae's latents have "
                              f"{vae_cfg.latent_channels}")
    if float(vae_cfg.get("shift_factor", 0.0) or 0.0) != 0.0:
        raise ConversionError("vae shift_factor != 0 is not supported")
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(
        name="text_diffusion", unet=unet_cfg.to_dict(), text=text_cfg.to_dict(), autoencoder=vae_cfg.to_dict(),
        embed_dim=0, context_dim=0, latent_scale=float(vae_cfg.get("scaling_factor", 0.18215)),
    ))
    config.task = scheduler_task(parts["scheduler"])
    if tokenizer is not None:
        config.task.null_tokens = [int(i) for i in tokenizer.tokenize([""], int(text_cfg.context_length))[0]]
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    config.data.image_size = int(unet_cfg.get("sample_size") or 64) * f
    config.data.text_length = int(text_cfg.context_length)
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.tokenizer.vocab_size = int(text_cfg.vocab_size)
    config.tokenizer.kind = "clip_bpe"
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict()
    return config, {"unet": unet_params, "text": text_params, "autoencoder": vae_params}
