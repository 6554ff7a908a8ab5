"""Latent diffusion (Rombach et al. 2022): a KL-regularised autoencoder, then a text-conditioned UNet
in its latent space (models.autoencoder_kl + tasks.autoencoder_kl, models.text_diffusion +
tasks.diffusion), as stages of one run through the one trainer.

    vlm-jax train --config configs/ldm.py:tiny --workdir runs/ldm     # clip, autoencoder, diffusion
    vlm-jax sample --workdir runs/ldm --prompt "a large red circle on the left" -n 8
    vlm-jax train --config configs/ldm.py:autoencoder_tiny --workdir runs/ae   # the first stage alone

Variants:

* tiny: three stages on the built-in world. `clip` (configs/clip.py:tiny, 600 steps) gives the
  text tower and the generation evaluator's judge; `autoencoder` (autoencoder_tiny below) learns
  32x32 images <-> 8x8x4 latents; `diffusion` loads the autoencoder whole (train.init_from_map
  "autoencoder:.", the previous stage) and the CLIP's text tower and projection (train.init_also
  "stage:clip=..."), both frozen (optim.trainable), measures the latent scale on its first batch
  (model.latent_scale 0: models.text_diffusion) and trains the UNet on the scaled latents: the
  cross-attention reads the tower's hidden states, the CLIP text embedding joins the time
  embedding. As configs/ddpm.py:tiny, its pixel-space counterpart, so that the two compare: the
  same CLIP stage, linear betas 1e-4 .. 0.02, v-prediction with min-SNR-5 loss weights, 10% of
  the captions dropped for guidance, 2000 steps of 64, DDIM 50 steps with guidance 1.5 for the
  evaluation (256 prompts, one sample each); but no x0 clipping (latents are not bounded to
  [-1, 1]), and a UNet of widths 64/128 with cross-attention at both levels on the 8x8x4 latents
  (ddpm's 32/64 sees 16x16x12 pixel blocks: about the same convolution cost per image).
* autoencoder_tiny: the first stage alone: AutoencoderKL with widths 32/64/128 (f = 4: 32x32 ->
  8x8, 4 latent channels), one resnet per level, mid-block attention; MSE reconstruction of the
  sample plus 1e-4 x the KL (per pixel value; tasks.autoencoder_kl), 1500 steps of 16 images, and
  the `reconstruction` evaluator (the world scorer on decode(mean)) at 750 and 1500.
* sd15: Stable Diffusion 1.5's sizes: UNet 320/640/1280/1280 (cross-attention at the first three
  levels, two resnets per level, 8 heads, cross-attention width 768), CLIP ViT-L/14's text tower
  (77 tokens, width 768, 12 layers, 12 heads; no pooled embedding), AutoencoderKL 128/256/512/512
  (f = 8, 4 latent channels, two resnets per level) at its published latent scale 0.18215,
  scaled-linear betas 0.00085 .. 0.012 over 1000 steps, epsilon prediction, 10% of the captions
  dropped; 512x512 images (data.source "coco" standing in for LAION), batch 2048, AdamW lr 1e-4
  warmed up over 10,000 steps then constant, 595,000 steps (the model card's recipe; weight decay
  1e-2, AdamW's usual default, is not in it). Built for `vlm-jax plan` and the golden sharding
  snapshots; not trained here (its autoencoder and text tower would come from a converted Stable
  Diffusion: vlm-jax convert --from-diffusers, then train.init_from).
"""

import os

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.config_defaults import base_config, default_mesh_and_rules

_CONFIGS = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("tiny", "autoencoder_tiny", "sd15")
_FROZEN = "^(?!text/|text_projection/|autoencoder/)"


def _unet(channels: tuple[int, ...], attn: tuple[bool, ...], layers: int, context: int, pooled: int,
          heads: int, groups: int, latent_channels: int, linear_projection: bool, dtype: str) -> dict:
    """A models.unet section over `latent_channels`-channel latents: cross-attention transformers at
    the levels `attn` marks, and in the mid block."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return dict(
        name="unet", in_channels=latent_channels, out_channels=latent_channels, block_out_channels=channels,
        layers_per_block=layers, down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=heads, cross_attention_dim=context, use_linear_projection=linear_projection,
        norm_num_groups=groups, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, pooled_dim=pooled, dropout=0.0,
        dtype=dtype,
    )


def _autoencoder(channels: tuple[int, ...], layers: int, groups: int, dtype: str = "float32") -> dict:
    """A models.autoencoder_kl section: 4 latent channels, f = 2 ** (len(channels) - 1)."""
    return dict(
        name="autoencoder_kl", in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        layers_per_block=layers, norm_num_groups=groups, mid_block_add_attention=True, use_quant_conv=True,
        use_post_quant_conv=True, dtype=dtype,
    )


def autoencoder_config(arg: str = "autoencoder_tiny") -> ml_collections.ConfigDict:
    """The first stage alone (the module docstring)."""
    if arg != "autoencoder_tiny":
        raise ValueError(f"unknown ldm autoencoder variant {arg!r}")
    config = base_config()
    # kl_weight 1e-4 against the MSE of [-1, 1] pixels (per pixel value, as the paper's 1e-6 is
    # against its summed L1 + LPIPS). One measurement (this config at 300 steps, cut off after 250
    # on a loaded machine, before its evaluation): the posterior means' std fell from 2.8 to 2.0
    # and the posterior std to 0.19 while the training MSE (of the sample) fell to 0.034 and was
    # still falling, so the run is 1500 steps; its reconstruction accuracies are not measured yet.
    config.task = ml_collections.ConfigDict(dict(name="autoencoder_kl", recon_loss="mse", kl_weight=1e-4))
    config.model = ml_collections.ConfigDict(_autoencoder((32, 64, 128), 1, 8))
    # Captions are not read here; text_length matches the later stages'.
    config.data.update(dict(image_size=32, text_length=20, batch_size=16))
    config.optim.update(dict(lr=1e-3, weight_decay=0.0, warmup_steps=50, clip_norm=1.0))
    config.train.update(dict(steps=1500, log_every=50, eval_every=750, ckpt_every=750))
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("reconstruction",), split="validation", num_examples=500, batch_size=256))
    )
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    return config


def _tiny() -> ml_collections.ConfigDict:
    clip_spec = os.path.join(_CONFIGS, "clip.py") + ":tiny"
    clip = config_lib.load(clip_spec)
    text = clip.model.text
    ae = autoencoder_config("autoencoder_tiny")
    config = base_config()
    config.task = ml_collections.ConfigDict(
        dict(name="diffusion", schedule="linear", num_train_steps=1000, beta_start=1e-4, beta_end=0.02,
             prediction="v_prediction", min_snr_gamma=5.0, cond_drop=0.1, sampler="ddim", sample_steps=50, eta=0.0,
             guidance=1.5, clip_sample=0.0)
    )
    config.model = ml_collections.ConfigDict(
        dict(
            name="text_diffusion", text=text.to_dict(), embed_dim=clip.model.embed_dim, context_dim=0,
            latent_scale=0.0, autoencoder=ae.model.to_dict(),
            # 8x8x4 latents: levels at 8x8 and 4x4, cross-attention at both (64 and 16 positions).
            unet=_unet((64, 128), (True, True), 1, text.width, clip.model.embed_dim, 4, 8, 4, True, "float32"),
        )
    )
    config.data.image_size = clip.data.image_size
    config.data.text_length = clip.data.text_length
    config.tokenizer.update(clip.tokenizer.to_dict())
    config.data.batch_size = 64
    config.optim.update(dict(lr=1e-3, weight_decay=0.0, warmup_steps=100, clip_norm=1.0))
    config.train.update(dict(steps=2000, log_every=50, eval_every=2000, ckpt_every=1000))
    config.stages = ml_collections.ConfigDict(
        dict(
            order=("clip", "autoencoder", "diffusion"),
            clip=dict(config=clip_spec, train=dict(steps=600, eval_every=600, ckpt_every=600)),
            # Trained from scratch (not from the CLIP before it); the diffusion stage takes it whole.
            autoencoder=dict(config=os.path.join(_CONFIGS, "ldm.py") + ":autoencoder_tiny", train=dict(init_from="")),
            diffusion=dict(train=dict(
                init_from_map="autoencoder:.",  # init_from: the previous stage, the autoencoder
                init_also=("stage:clip=text:text,text_projection:text_projection",),
            )),
        )
    )
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("generation",), split="validation", num_examples=256, samples_per_prompt=1,
                      clip_workdir="stage:clip", batch_size=256, grid_prompts=8, seed=0))
    )
    return config


def _sd15() -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(
        dict(name="diffusion", schedule="scaled_linear", num_train_steps=1000, beta_start=0.00085, beta_end=0.012,
             prediction="epsilon", min_snr_gamma=0.0, cond_drop=0.1, sampler="ddim", sample_steps=50, eta=0.0,
             guidance=7.5, clip_sample=0.0, spacing="leading", steps_offset=1, prev_rule="diffusers",
             set_alpha_to_one=False)
    )
    text = dict(context_length=77, width=768, depth=12, heads=12, mlp_ratio=4.0, vocab_size=49408,
                act="quick_gelu", ln_eps=1e-5, pad_id=0, eos_id=49407, dtype="bfloat16")
    config.model = ml_collections.ConfigDict(
        dict(
            name="text_diffusion", text=text, embed_dim=0, context_dim=0, latent_scale=0.18215,
            autoencoder=_autoencoder((128, 256, 512, 512), 2, 32, "bfloat16"),
            unet=_unet((320, 640, 1280, 1280), (True, True, True, False), 2, 768, 0, 8, 32, 4, False, "bfloat16"),
        )
    )
    config.data.update(dict(image_size=512, text_length=77, source="coco", batch_size=2048))
    config.tokenizer.update(dict(vocab_size=49408, kind="clip_bpe"))
    config.optim.update(dict(lr=1e-4, weight_decay=1e-2, warmup_steps=10_000, schedule="constant", clip_norm=1.0))
    config.train.update(dict(steps=595_000, eval_every=10_000, ckpt_every=2_000))
    config.train.init_from = ""  # a converted Stable Diffusion (vlm-jax convert --from-diffusers)
    config.train.init_from_map = "text:text,autoencoder:autoencoder"
    config.evals = ml_collections.ConfigDict()
    return config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg == "autoencoder_tiny":
        return autoencoder_config(arg)
    if arg == "tiny":
        config = _tiny()
    elif arg == "sd15":
        config = _sd15()
    else:
        raise ValueError(f"unknown ldm variant {arg!r}; choose one of {VARIANTS}")
    config.optim.trainable = _FROZEN
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    return config
