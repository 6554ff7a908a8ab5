"""CoCa: contrastive captioners (Yu et al. 2022), contrastive + captioning losses.

    vlm-jax train --config configs/coca.py:tiny --workdir runs/coca

Variants: tiny (CPU, the built-in world) and base (CoCa-Base's sizes, Table 1 of the paper:
ViT 12 layers, width 768, MLP 3072, 12 heads; text decoder 12 unimodal + 12 multimodal layers,
width 768, MLP 3072, 12 heads; 288x288 images in 18x18 patches = 256 image tokens; captioning
pooler of 256 queries, contrastive pooler of 1; loss weights contrastive 1, captioning 2;
batch 65,536, 500k steps). The paper does not give the joint embedding width; 768 here.
"""

import math

import ml_collections

from vlm_jax.config_defaults import base_config, default_mesh_and_rules


def _model(image: dict, text: dict, embed_dim: int, caption_queries: int, pooler_heads: int):
    return ml_collections.ConfigDict(
        dict(
            name="coca",
            embed_dim=embed_dim,
            # The poolers read every patch token: no class token.
            image=dict(mlp_ratio=4.0, act="gelu", ln_eps=1e-6, **image),
            # unimodal_depth layers of causal self-attention (+ [CLS] at the end: the text
            # embedding), then multimodal_depth layers with cross-attention to the image.
            text=dict(mlp_ratio=4.0, act="gelu", ln_eps=1e-6, pad_id=0, eos_id=3, **text),
            caption_queries=caption_queries,
            pooler_heads=pooler_heads,
            logit_scale_init=math.log(1 / 0.07),
            logit_scale_max=math.log(100.0),
            dtype="float32",  # compute dtype; params stay float32
            scan_layers=False,
            remat="none",  # none | full | dots
        )
    )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(
        dict(name="coca", contrastive_weight=1.0, caption_weight=2.0)
    )
    if arg == "tiny":
        config.model = _model(
            # 8x8 patches (16 image tokens): 4x4 patches ran at under 1 step/s on a 2-core CPU.
            dict(image_size=32, patch_size=8, width=128, depth=4, heads=4),
            dict(vocab_size=512, context_length=20, width=128, unimodal_depth=2, multimodal_depth=2, heads=4),
            embed_dim=128,
            caption_queries=16,
            pooler_heads=4,
        )
        config.data.image_size = 32
        # The world's longest caption is 18 tokens with bos/eos.
        config.data.text_length = 20
        config.tokenizer.vocab_size = 512
        config.data.batch_size = 128
        config.optim.lr = 1e-3  # not tuned for CoCa
        config.optim.warmup_steps = 100
        config.train.steps = 900
        config.train.log_every = 50
        config.train.eval_every = 900
        config.train.ckpt_every = 450
    elif arg == "base":
        config.model = _model(
            dict(image_size=288, patch_size=18, width=768, depth=12, heads=12),
            dict(vocab_size=64000, context_length=64, width=768, unimodal_depth=12, multimodal_depth=12, heads=12),
            embed_dim=768,
            caption_queries=256,
            pooler_heads=12,
        )
        config.model.dtype = "bfloat16"
        config.model.scan_layers = True
        config.data.image_size = 288
        config.data.text_length = 64
        config.data.source = "coco"
        config.data.batch_size = 65536
        config.tokenizer.vocab_size = 64000
        config.optim.lr = 5e-4
        config.optim.weight_decay = 0.01
        config.optim.b2 = 0.999
        config.optim.warmup_steps = 10_000  # 2% of the 500k steps
        config.optim.schedule = "cosine"  # the paper decays linearly
        config.train.steps = 500_000
    else:
        raise ValueError(f"unknown coca variant {arg!r}; choose tiny or base")
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("zero_shot", "retrieval"), split="validation", num_examples=1024))
    )
    if arg == "tiny":
        # Held-out captions (beam 3) against the nearest-training-image caption, and how much of
        # each colour/shape word's attention (rolled out through the captioning pooler) falls on
        # the object it names.
        config.evals.caption = ml_collections.ConfigDict(
            dict(
                kinds=("caption",), split="validation", num_examples=500, method="beam", beam_size=3,
                max_new_tokens=19, batch_size=128, baseline=True, grounding=True,
            )
        )
    return config
