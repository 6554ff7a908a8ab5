"""unCLIP (DALL-E 2, Ramesh et al. 2022): a prior draws a CLIP image embedding from the caption, a
decoder draws a low-resolution image from it, and two diffusion upsamplers raise the resolution.

    vlm-jax train --config configs/unclip.py:tiny --workdir runs/unclip   # clip, prior, decoder, upsample1, upsample2
    vlm-jax sample --workdir runs/unclip --prompt "a large red circle on the left" -n 8

Variants:

* tiny: five stages on the built-in world. Stage "clip" trains the tiny world CLIP
  (configs/clip.py:tiny, 600 steps, as configs/ddpm.py:tiny's first stage). Stage "prior"
  (prior_tiny) holds that whole run, frozen, as its `clip` (train.init_from_map "clip:.",
  optim.trainable "^(?!clip/)") and trains a causal transformer of width 128, 4 layers, 4 heads
  over [the caption's 20 CLIP text tokens, text embedding, timestep, noised image embedding,
  query] to predict the clean CLIP image embedding (E = 128) of the 32x32 world images: cosine
  schedule, T = 1000, 10% of the captions dropped for guidance; DDIM 64 steps, guidance 2, best of
  2 (evals.prior: cosine of the sampled embedding with the true image's, against the real
  caption's ceiling and the shuffled-caption floor, and top-1 retrieval of the true image).
  Stage "decoder" (decoder_tiny) holds the prior run whole ("prior:.") and trains a UNet at 16x16
  (the 32x32 images average-pooled) conditioned on the CLIP image embedding (time embedding and 4
  extra context tokens) and the caption's CLIP hidden states; captions dropped 50%, embeddings
  zeroed 10%. Stage "upsample1" (upsample1_tiny) raises 16 -> 32 (trained on Gaussian-blurred
  low-resolution images), stage "upsample2" (tiny itself) 32 -> 64 on 64x64 world images
  (trained on the BSR-style mix), each holding the stage before whole ("base:."). The stage
  settings are untuned: no learning run of the chain yet.
* published: the paper's prior at its size, for `vlm-jax plan`: a causal transformer of width
  2048, 24 layers, 32 heads over the 77 text tokens of a CLIP ViT-H/16 (256x256 images, image tower
  width 1280 x 32 layers, text tower width 1024 x 24 layers, embedding 1024), T = 1000 cosine, 64
  sampling steps; not trained here (the CLIP would come from `vlm-jax convert`).
* decoder_published, upsample1_published, upsample2_published: the decoder at 64x64 on that prior
  (a GLIDE-size UNet, 2.87B parameters: see _DECODER_UNET) and the two upsamplers 64 -> 256 and
  256 -> 1024 (728M and 276M), each holding the stage before whole; for `vlm-jax plan` and the
  golden sharding snapshots, not trained here.
"""

import os

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.config_defaults import base_config, default_mesh_and_rules

_CONFIGS = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("tiny", "prior_tiny", "decoder_tiny", "upsample1_tiny", "published", "decoder_published",
            "upsample1_published", "upsample2_published")
_UNCLIP = os.path.join(_CONFIGS, "unclip.py")

# The prior's transformer per variant.
_PRIOR = {
    "tiny": dict(width=128, depth=4, heads=4),
    "published": dict(width=2048, depth=24, heads=32, dtype="bfloat16", scan_layers=True),
}

# The paper's CLIP: ViT-H/16 at 256x256 (image tower width 1280, 32 layers), a text tower of width
# 1024 and 24 layers over 77 tokens, joint embedding 1024. Changes to configs/clip.py:l14's model.
_CLIP_H16 = {
    "model.embed_dim": 1024, "model.image.patch_size": 16, "model.image.width": 1280, "model.image.depth": 32,
    "model.image.heads": 16, "model.image.image_size": 256, "model.text.width": 1024, "model.text.depth": 24,
    "model.text.heads": 16, "model.text.context_length": 77,
}


def prior_task(**overrides) -> ml_collections.ConfigDict:
    """The diffusion prior's task section (tasks.diffusion_prior), with overrides."""
    task = dict(
        name="diffusion_prior", schedule="cosine", num_train_steps=1000, prediction="sample", min_snr_gamma=0.0,
        cond_drop=0.1, sampler="ddim", sample_steps=64, eta=0.0, guidance=2.0, best_of=2, clip_sample=0.0,
    )
    return ml_collections.ConfigDict({**task, **overrides})


def prior_model(clip_model: ml_collections.ConfigDict, width: int, depth: int, heads: int,
                **extra) -> ml_collections.ConfigDict:
    """A models.unclip_prior section around the CLIP model section `clip_model`."""
    model = dict(
        name="unclip_prior", clip=clip_model.to_dict(), width=width, depth=depth, heads=heads, mlp_ratio=4.0,
        act="gelu", ln_eps=1e-5, dtype="float32", scan_layers=False, remat="none",
    )
    return ml_collections.ConfigDict({**model, **extra})


def _published_clip() -> ml_collections.ConfigDict:
    return config_lib.load(os.path.join(_CONFIGS, "clip.py") + ":l14", _CLIP_H16)


def _unet(channels: tuple[int, ...], attn: tuple[bool, ...], *, in_channels: int = 3, context: int = 0,
          pooled: int = 0, heads: int | tuple[int, ...] = 4, groups: int = 8, layers: int = 1,
          dropout: float = 0.0, dtype: str = "float32") -> dict:
    """A models.unet section: cross-attention at the levels `attn` marks (context > 0), else none."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return dict(
        name="unet", in_channels=in_channels, out_channels=3, block_out_channels=channels, layers_per_block=layers,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn" if context else "",
        attention_head_dim=heads, cross_attention_dim=context, use_linear_projection=True, norm_num_groups=groups,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, pooled_dim=pooled, dropout=dropout, dtype=dtype,
    )


def _sampling(**overrides) -> dict:
    """The UNet stages' diffusion settings: v-prediction with min-SNR-5 weights (what the DDPM of
    configs/ddpm.py:tiny learnt best with), DDIM."""
    return dict(schedule="linear", num_train_steps=1000, beta_start=1e-4, beta_end=0.02, prediction="v_prediction",
                min_snr_gamma=5.0, sampler="ddim", eta=0.0, clip_sample=1.0, threshold=0.0,
                threshold_max=0.0, **overrides)


def _prior_tiny() -> ml_collections.ConfigDict:
    config = base_config()
    config.task = prior_task()
    clip = config_lib.load(os.path.join(_CONFIGS, "clip.py") + ":tiny")
    config.model = prior_model(clip.model, **_PRIOR["tiny"])
    config.data.image_size = clip.data.image_size
    config.data.text_length = clip.data.text_length
    config.tokenizer.update(clip.tokenizer.to_dict())
    config.data.batch_size = 128
    config.optim.update(dict(lr=1e-3, weight_decay=0.0, warmup_steps=100, clip_norm=1.0))
    config.train.update(dict(steps=2000, log_every=50, eval_every=1000, ckpt_every=1000, init_from_map="clip:."))
    config.optim.trainable = "^(?!clip/)"
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("prior",), split="validation", num_examples=256, batch_size=256, seed=0))
    )
    return config


def _generation_eval(**overrides) -> ml_collections.ConfigDict:
    val = dict(kinds=("generation",), split="validation", num_examples=256, samples_per_prompt=1,
               clip_workdir="stage:clip", batch_size=256, grid_prompts=8, seed=0)
    return ml_collections.ConfigDict(dict(val={**val, **overrides}))


def _decoder_tiny() -> ml_collections.ConfigDict:
    config = _prior_tiny()
    clip = config.model.clip
    config.model = ml_collections.ConfigDict(dict(
        name="unclip_decoder", prior=config.model.to_dict(), image_tokens=4, context_dim=0, downsample=2,
        unet=_unet((32, 64), (False, True), context=int(clip.text.width), pooled=int(clip.embed_dim)),
    ))
    config.task = ml_collections.ConfigDict(dict(
        name="unclip_decoder", cond_drop=0.5, embed_drop=0.1, guidance=1.5, sample_steps=50,
        prior=prior_task().to_dict(), **_sampling()))
    config.data.batch_size = 64
    config.train.update(dict(steps=1500, eval_every=1500, ckpt_every=750, init_from_map="prior:."))
    config.optim.trainable = "^(?!prior/)"
    config.evals = _generation_eval()
    return config


def _upsampler(base: ml_collections.ConfigDict, channels: tuple[int, ...], degrade: str, size: int,
               steps: int, factor: int = 2, layers: int = 1, groups: int = 8, batch_size: int = 32,
               dtype: str = "float32") -> ml_collections.ConfigDict:
    """An upsampler stage (no caption, no attention) over the stage config `base`, at data.image_size
    `size` = factor x base's."""
    from vlm_jax.tasks.diffusion_upsample import stage_config

    unet = _unet(channels, (False,) * len(channels), in_channels=6, layers=layers, groups=groups, dtype=dtype)
    config = stage_config(base, unet, factor=factor, degrade=degrade, sample_steps=20,
                          **_sampling())
    config.data.image_size = size
    config.data.batch_size = batch_size
    config.train.update(dict(steps=steps, eval_every=steps, ckpt_every=steps))
    config.evals = _generation_eval(batch_size=128)
    return config


# The published decoder and upsamplers (section 2.1, appendix C). The decoder is GLIDE's 64x64
# ADM UNet: width 512, channel multipliers (1, 2, 3, 4), three residual blocks per level, attention
# at 32, 16 and 8 with 64 channels per head, dropout 0.1 (GLIDE, Nichol et al. 2022, section 4):
# 2.87B parameters here (our blocks are UNet2DConditionModel's: each attention level a transformer
# block with self-attention, cross-attention and a GEGLU MLP, larger than ADM's attention block).
# GLIDE's own 1.2B text transformer, which made its 3.5B, is not built: the
# captions come in as the CLIP text tower's hidden states (as in `tiny`), with the 4 image-embedding
# tokens beside them. The upsamplers: ADM UNets without attention (the paper: "only spatial
# convolutions"), no caption, 64 -> 256 with the blur and 256 -> 1024 with the BSR mix, two
# residual blocks per level, widths chosen here to land near the paper's 700M and 300M (728M and
# 276M; the widths themselves are not in the paper's text). Schedules, batch
# sizes and learning rates of these three are placeholders for `vlm-jax plan` (tiny's sampling
# settings, the paper's 2048 / 1024 batch scale), not the paper's table.
_DECODER_UNET = dict(channels=(512, 1024, 1536, 2048), attn=(False, True, True, True), layers=3,
                     heads=(8, 16, 24, 32), groups=32, dropout=0.1)
_UPSAMPLERS = ((416, 832, 1248, 1664), (256, 512, 768, 1024))  # 728M and 276M parameters
_UPSAMPLE_PUBLISHED = dict(factor=4, layers=2, groups=32, batch_size=1024, dtype="bfloat16")


def _decoder_published() -> ml_collections.ConfigDict:
    config = get_config("published")  # the prior, on the CLIP ViT-H/16
    clip = config.model.clip
    u = _DECODER_UNET
    config.model = ml_collections.ConfigDict(dict(
        name="unclip_decoder", prior=config.model.to_dict(), image_tokens=4, context_dim=0, downsample=4,
        unet=_unet(u["channels"], u["attn"], context=int(clip.text.width), pooled=int(clip.embed_dim),
                   heads=u["heads"], groups=u["groups"], layers=u["layers"], dropout=u["dropout"], dtype="bfloat16"),
    ))
    config.task = ml_collections.ConfigDict(dict(
        name="unclip_decoder", cond_drop=0.5, embed_drop=0.1, guidance=1.5, sample_steps=250,
        prior=config.task.to_dict(), **_sampling()))
    config.data.batch_size = 2048
    config.optim.update(dict(lr=1.2e-4, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=5000))
    config.train.update(dict(steps=800_000, init_from_map="prior:."))
    config.optim.trainable = "^(?!prior/)"
    return config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown unclip variant {arg!r}; choose one of {VARIANTS}")
    if arg == "prior_tiny":
        config = _prior_tiny()
    elif arg == "decoder_tiny":
        config = _decoder_tiny()
    elif arg == "upsample1_tiny":
        config = _upsampler(_decoder_tiny(), (16, 32), "blur", 32, 600)
    elif arg == "tiny":
        config = _upsampler(get_config("upsample1_tiny"), (16, 32), "bsr", 64, 400)
        # data.image_size is shared by the stages that load their own config: each sets its own again.
        stage = lambda variant, size, **kw: dict(config=f"{_UNCLIP}:{variant}", data=dict(image_size=size), **kw)  # noqa: E731
        config.stages = ml_collections.ConfigDict(dict(
            order=("clip", "prior", "decoder", "upsample1", "upsample2"),
            clip=dict(config=os.path.join(_CONFIGS, "clip.py") + ":tiny", data=dict(image_size=32),
                      train=dict(steps=600, eval_every=600, ckpt_every=600)),
            prior=stage("prior_tiny", 32), decoder=stage("decoder_tiny", 32), upsample1=stage("upsample1_tiny", 32),
            upsample2=dict(),
        ))
    elif arg == "decoder_published":
        config = _decoder_published()
    elif arg == "upsample1_published":  # 64 -> 256, Gaussian blur
        config = _upsampler(_decoder_published(), _UPSAMPLERS[0], "blur", 256, 1_000_000, **_UPSAMPLE_PUBLISHED)
    elif arg == "upsample2_published":  # 256 -> 1024, the BSR-style mix
        config = _upsampler(get_config("upsample1_published"), _UPSAMPLERS[1], "bsr", 1024, 1_000_000,
                            **_UPSAMPLE_PUBLISHED)
    else:
        config = base_config()
        config.task = prior_task()
        clip = _published_clip()
        config.model = prior_model(clip.model, **_PRIOR[arg])
        config.data.update(dict(image_size=256, text_length=77, source="coco", batch_size=4096))
        config.tokenizer.vocab_size = 49408
        # AdamW as the paper's prior (its appendix table; the schedule's warmup is ours).
        config.optim.update(dict(lr=1.1e-4, b2=0.96, eps=1e-6, weight_decay=6e-2, warmup_steps=5000, clip_norm=1.0))
        config.train.update(dict(steps=600_000, eval_every=10_000))
        config.train.init_from = ""  # a converted CLIP ViT-H/16 (vlm-jax convert)
        config.train.init_from_map = "clip:."
        config.optim.trainable = "^(?!clip/)"
        config.evals = ml_collections.ConfigDict()
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    return config
