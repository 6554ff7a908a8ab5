"""DALL-E (Ramesh et al. 2021): an image tokenizer, then a transformer over text and image tokens.

    vlm-jax train --config configs/dalle.py:tiny --workdir runs/dalle     # clip, tokenizer, transformer
    vlm-jax sample --workdir runs/dalle --prompt "a large red circle on the left" -n 8 --rerank 64
    vlm-jax train --config configs/dalle.py:tokenizer_tiny --workdir runs/dvae   # a tokenizer alone

Transformer variants (models.dalle, tasks.dalle):

* tiny: three stages on the built-in world. `clip` (configs/clip.py:tiny, 600 steps) is the judge
  of the generation evaluator (CLIP score, Fréchet distance, best-of-8 reranking); `tokenizer`
  (tokenizer_tiny_vq below) makes the 8x8 image tokens; `transformer` reads the tokenizer whole
  (train.init_from_map "tokenizer:.": its params and its VQ statistics, frozen by
  optim.trainable) and trains the stream [20 text tokens; 64 image tokens], 1800 steps of 64, 20% of
  the captions dropped for classifier-free guidance, the image codes read and scored through the
  tokenizer's code vectors (model.code_features "only"; README: 18m16s for all three stages,
  val/gen/main_acc 0.605, held-out pairs 0.375, best of 8 by CLIP 0.719; a second run on 8 host
  devices 0.531, best of 8 0.742).
* tiny_clip_text: tiny whose transformer also reads the caption through the CLIP stage's frozen
  text tower (model.text_condition "clip", train.init_also "stage:clip=..."): 0.551 in one run
  (held-out 0.316), no better than tiny, and 20m50s.
* 12b: the paper's transformer, 64 layers of width 3968, 62 heads of 64, 256 text tokens from
  16,384 (plus a pad per position) and 32x32 image tokens from 8192 codes, row / column / conv
  masks: 12,293,824,256 parameters besides its tokenizer (the published dVAE below, 54.8M);
  bfloat16 with full remat, AdamW as in appendix B.2. Built for `vlm-jax plan` and the golden
  sharding snapshots; not trained here.

Tokenizer variants (models.dvae, tasks.image_tokenizer):

* tokenizer_tiny: the discrete VAE on the built-in world, 32x32 images -> an 8x8 grid of codes
  from K = 512 (three groups of one residual block, 32/64/128 channels, 64-d code embedding),
  1200 steps of 64 images; Gumbel temperature 1 -> 1/16 and KL weight 0 -> 0.02 (cosine) over the
  first 600, MSE reconstruction, and a codebook-usage term (weight 0.2) against code collapse.
  Measured (1200 steps, 500 validation images, 2 shared CPU cores, 14m36s): reconstructions from
  the hard codes keep colour 0.981, size 0.959 and position 0.990 but shape only 0.588 (main
  object 0.668, whole scene 0.330); perplexity 162, 135 of 512 codes unused, MSE 0.019. Corners
  and arms come back rounded: shape misses issue 15's 0.95 bar (the slow test asserts it).
* tokenizer_tiny_vq: the same encoder and decoder around layers.VectorQuantizer (EMA codebook,
  dead-code restarts), 2000 steps of 16 images, EMA decay 0.95 (the tiny DALL-E's tokenizer).
  Measured (500 validation images, 5m22s on 2 cores, one other process running): colour 0.998,
  shape 0.984, size 0.994, position 0.999 (main object 0.996, whole scene 0.954); perplexity 138,
  no unused code, MSE 0.0032; with seed 1 shape 0.956 (the other three >= 0.99). The earlier
  setting (1200 steps of 64, decay 0.99) gave shape 0.935 in 11m12s: its codebook sat collapsed
  for the first ~300 steps.
* tokenizer: the paper's dVAE, 256x256 -> 32x32 codes from K = 8192: four groups of two blocks,
  n_hid 256 (256/512/1024/2048 channels), 128-d code embedding, 7x7 input conv, temperature
  1 -> 1/16 over 150,000 updates, KL weight 0 -> 6.6 over 5000 (cosine), batch 512, lr 1e-4 with
  a cosine decay. It builds and is in the golden sharding snapshots; not trained here.

Every tokenizer run reports the `reconstruction` evaluator on held-out images (hard codes through
the decoder: what the transformer will see): pixel MSE, codebook perplexity and dead codes over the
split, and the world scorer's per-attribute accuracy on the reconstructions.

Later stages (the transformer, and a `tiny` that chains stages as configs/show_tell.py does) add
their variants to `get_config` and use `tokenizer_config` as the first stage's base.
"""

import os

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.config_defaults import base_config, default_mesh_and_rules

TOKENIZER_VARIANTS = ("tokenizer_tiny", "tokenizer_tiny_vq", "tokenizer")
TRANSFORMER_VARIANTS = ("tiny", "tiny_clip_text", "12b")
_CONFIGS = os.path.dirname(os.path.abspath(__file__))


def _tiny_model(kind: str) -> ml_collections.ConfigDict:
    model = dict(
        name="dvae", kind=kind, num_codes=512, hidden=32, channel_mults=(1, 2, 4), blocks_per_group=1,
        embed_dim=64, input_kernel=3, dtype="float32",
    )
    if kind == "vqvae":
        model["vq"] = dict(beta=0.25, ema=True, decay=0.99, dead_code_threshold=0.05, impl="auto")
    return ml_collections.ConfigDict(model)


def tokenizer_config(arg: str) -> ml_collections.ConfigDict:
    """The config of one tokenizer variant (see the module docstring)."""
    config = base_config()
    config.task = ml_collections.ConfigDict(
        dict(
            name="image_tokenizer", recon_loss="mse", temperature_start=1.0, temperature_end=1.0 / 16,
            temperature_schedule="cosine", temperature_steps=0, kl_weight_start=0.0, kl_weight_end=6.6,
            kl_steps=0, usage_weight=0.0, straight_through=False,
        )
    )
    if arg in ("tokenizer_tiny", "tokenizer_tiny_vq"):
        config.model = _tiny_model("dvae" if arg == "tokenizer_tiny" else "vqvae")
        # Captions are not read here; text_length matches the later stages'.
        config.data.update(dict(image_size=32, text_length=20, batch_size=64))
        config.optim.update(dict(lr=2e-3, weight_decay=0.0, warmup_steps=50))
        config.train.update(dict(steps=1200, log_every=50, eval_every=600, ckpt_every=600))
        # The paper's schedules compressed into the first half of the run; its KL weight 6.6 is for
        # a logit-Laplace likelihood: against the MSE / L1 of normalised pixels a weight of that
        # size keeps the posteriors spread out. The usage term keeps the codes from collapsing.
        config.task.update(dict(temperature_steps=600, kl_steps=600, kl_weight_end=0.02, usage_weight=0.2))
        if arg == "tokenizer_tiny_vq":
            # Batches of 16 for 2000 steps (the same images per second as 64, more updates), and
            # an EMA decay of 0.95: with 0.99 the usage counts, which start at 1, take ~300 steps
            # to fall under the dead-code threshold, and until then the codebook sits collapsed on
            # a couple of codes.
            config.data.batch_size = 16
            config.model.vq.decay = 0.95
            config.train.update(dict(steps=2000, eval_every=2000, ckpt_every=2000))
        num_eval = 500
    elif arg == "tokenizer":
        config.model = ml_collections.ConfigDict(
            dict(
                name="dvae", kind="dvae", num_codes=8192, hidden=256, channel_mults=(1, 2, 4, 8),
                blocks_per_group=2, embed_dim=128, input_kernel=7, dtype="float32",
            )
        )
        config.data.update(dict(image_size=256, source="coco", batch_size=512))
        config.optim.update(dict(lr=1e-4, weight_decay=1e-4, b2=0.999, warmup_steps=1000,
                                 min_lr_ratio=1.25e-6 / 1e-4))
        config.train.update(dict(steps=3_000_000, eval_every=10_000))
        config.task.update(dict(temperature_steps=150_000, kl_steps=5000))
        num_eval = 5000
    else:
        raise ValueError(f"unknown dalle tokenizer variant {arg!r}; choose one of {TOKENIZER_VARIANTS}")
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("reconstruction",), split="validation", num_examples=num_eval, batch_size=256))
    )
    return config


def _tiny_transformer() -> ml_collections.ConfigDict:
    """The world model: clip, tokenizer and transformer stages (the module docstring)."""
    clip_spec = os.path.join(_CONFIGS, "clip.py") + ":tiny"
    clip = config_lib.load(clip_spec)
    tokenizer_variant = "tokenizer_tiny_vq"
    tok = tokenizer_config(tokenizer_variant)
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(
            name="dalle", text_vocab=clip.tokenizer.vocab_size, text_len=clip.data.text_length, grid=8,
            width=128, depth=4, heads=4, head_dim=32, mlp_ratio=4.0, mask_pattern="causal", conv_kernel=5,
            pad_id=0, dtype="float32", remat="none", scan_layers=False, code_features="only",
            text_condition="none", dropout=0.1, tokenizer=tok.model.to_dict(),
        )
    )
    config.data.update(dict(image_size=clip.data.image_size, text_length=clip.data.text_length, batch_size=64))
    config.tokenizer.vocab_size = clip.tokenizer.vocab_size
    config.optim.update(dict(lr=2e-3, weight_decay=0.01, warmup_steps=100))
    config.train.update(dict(steps=1800, log_every=50, eval_every=1800, ckpt_every=600))
    config.stages = ml_collections.ConfigDict(
        dict(
            order=("clip", "tokenizer", "transformer"),
            clip=dict(config=clip_spec, train=dict(steps=600, eval_every=600, ckpt_every=600)),
            # Trained from scratch (not from the CLIP before it); the transformer stage then takes it whole.
            tokenizer=dict(config=os.path.join(_CONFIGS, "dalle.py") + ":" + tokenizer_variant,
                           train=dict(init_from="")),
            transformer=dict(),
        )
    )
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("generation",), split="validation", num_examples=256, samples_per_prompt=8,
                      clip_workdir="stage:clip", batch_size=256, grid_prompts=8, seed=0))
    )
    return config


def _published_transformer() -> ml_collections.ConfigDict:
    """The paper's 12B transformer on the published tokenizer (256x256 -> 32x32 codes, K = 8192)."""
    config = base_config()
    config.model = ml_collections.ConfigDict(
        dict(
            name="dalle", text_vocab=16384, text_len=256, grid=32, width=3968, depth=64, heads=62, head_dim=64,
            mlp_ratio=4.0, mask_pattern="dalle", conv_kernel=11, pad_id=0, dtype="bfloat16", remat="full", scan_layers=True,
            code_features="none", text_condition="none", dropout=0.0,
            tokenizer=tokenizer_config("tokenizer").model.to_dict(),
        )
    )
    config.data.update(dict(image_size=256, text_length=256, source="coco", batch_size=1024))
    config.tokenizer.vocab_size = 16384
    # Sec. 2.4 / appendix B.2: AdamW (b1 0.9, b2 0.96, eps 1e-8, weight decay 4.5e-2), lr 4.5e-4
    # warmed up over 5000 steps then cosine, gradients clipped at norm 4, batch 1024, 430,000 updates.
    config.optim.update(dict(lr=4.5e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2, warmup_steps=5000,
                             clip_norm=4.0))
    config.train.update(dict(steps=430_000, eval_every=10_000, ckpt_every=2_000))
    config.train.init_from = ""  # the trained tokenizer's run
    config.evals = ml_collections.ConfigDict()
    return config


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg in TOKENIZER_VARIANTS:
        return tokenizer_config(arg)
    if arg in ("tiny", "tiny_clip_text"):
        config = _tiny_transformer()
        if arg == "tiny_clip_text":
            # The caption also through the CLIP stage's frozen text tower (models.dalle
            # text_condition; README: not better than tiny in one run, 0.551 against 0.53-0.61).
            clip = config_lib.load(config.stages.clip.config)
            config.model.update(dict(text_condition="clip", clip_text=clip.model.text.to_dict(),
                                     clip_embed_dim=clip.model.embed_dim))
            config.stages.transformer = ml_collections.ConfigDict(dict(train=dict(
                init_also=("stage:clip=clip_text:text,clip_projection:text_projection",))))
    elif arg == "12b":
        config = _published_transformer()
    else:
        raise ValueError(f"unknown dalle variant {arg!r}; choose one of {TOKENIZER_VARIANTS + TRANSFORMER_VARIANTS}")
    config.task = ml_collections.ConfigDict(
        dict(name="dalle", text_loss_weight=1.0 / 8, text_drop=0.0, word_drop=0.0, temperature=1.0, top_k=0, top_p=1.0,
             guidance=0.0, guidance_floor=0.0)
    )
    if arg in ("tiny", "tiny_clip_text"):
        # Sampling: temperature 0.5 over the image codes (at 1.0 the tiny model's stray tokens break
        # the shapes: val/gen/main_acc 0.28 at 1.0, 0.37 at 0.5, 0.41 greedy, one checkpoint), with
        # classifier-free guidance 5 among the codes of conditional probability >= 0.05 x the top
        # one's (captions dropped for 20% of training). The image codes enter and leave through the
        # tokenizer's code vectors (model.code_features "only"). One 1800-step model, 256 prompts,
        # floor 0.05: guidance 3 / 5 / 7 -> 0.61 / 0.61 / 0.62 (held-out pairs 0.39 / 0.38 / 0.40);
        # floor 0.1 at 5: 0.56. README: the code_features and guidance ablations. task.word_drop 0.15
        # (inner caption pieces dropped; same clip and tokenizer stages as the 0.605 run): 0.434,
        # held-out pairs 0.213, so it stays off. model.dropout 0.1 (the same stages): 0.766,
        # held-out 0.640, best of 8 by CLIP 0.820, against 0.605 / 0.375 / 0.719 without.
        config.task.update(dict(text_drop=0.2, temperature=0.5, guidance=5.0, guidance_floor=0.05))
    # The tokenizer (params and VQ statistics) comes whole from the previous stage / init_from, frozen.
    config.train.init_from_map = "tokenizer:."
    config.optim.trainable = "^(?!tokenizer/)"
    if arg == "tiny_clip_text":  # and the CLIP text tower, frozen
        config.optim.trainable = "^(?!tokenizer/|clip_text/|clip_projection/)"
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    return config
