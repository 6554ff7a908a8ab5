"""ViT: image classification with a Vision Transformer.

    vlm-jax train --config configs/vit.py:tiny --workdir runs/vit

Variants: tiny (CPU, minutes: the built-in world's 48 colour x shape classes at 32x32), b16, l16,
h14 (the published ViT-B/16, L/16, H/14 at 224 with ImageNet-21k pretraining settings).
"""

import ml_collections

from vlm_jax.config_defaults import base_config, default_mesh_and_rules

# name -> (patch size, width, depth, heads, mlp dim), as in Dosovitskiy et al. 2021, table 1.
_PUBLISHED = {
    "b16": (16, 768, 12, 12, 3072),
    "l16": (16, 1024, 24, 16, 4096),
    "h14": (14, 1280, 32, 16, 5120),
}
_IMAGENET21K_CLASSES = 21843


def _model(
    image_size: int,
    patch: int,
    width: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    num_classes: int,
    **kwargs,
) -> ml_collections.ConfigDict:
    model = dict(
        name="vit",
        image_size=image_size,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_dim / width,
        mlp_dim=mlp_dim,  # wins over mlp_ratio when > 0
        pool="cls",  # cls | gap (mean of the patch tokens)
        class_token=True,
        pre_norm=False,
        act="gelu",  # gelu (exact) | gelu_tanh | quick_gelu
        ln_eps=1e-6,
        patch_bias=True,
        qkv_bias=True,
        final_norm=True,
        representation_size=0,  # > 0: dense + tanh pre-logits before the head
        num_classes=num_classes,
        dtype="float32",  # compute dtype; params stay float32
        scan_layers=False,
        remat="none",  # none | full | dots
    )
    model.update(kwargs)
    return ml_collections.ConfigDict(model)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(dict(name="classification"))
    if arg == "tiny":
        # 8x8 patches: 16 tokens, so a step costs about what the tiny CLIP's does.
        config.model = _model(32, 8, 128, 4, 4, 512, 48, pool="gap", class_token=False)
        config.data.image_size = 32
        config.data.batch_size = 128
        config.optim.lr = 1e-3
        config.optim.weight_decay = 0.05
        config.optim.warmup_steps = 100
        config.train.steps = 2000
        config.train.log_every = 50
        config.train.eval_every = 500
        config.train.ckpt_every = 1000
    elif arg in _PUBLISHED:
        patch, width, depth, heads, mlp_dim = _PUBLISHED[arg]
        # ImageNet-21k pretraining: pre-logits layer, batch 4096, Adam, 90 epochs of ~14M images.
        config.model = _model(
            224,
            patch,
            width,
            depth,
            heads,
            mlp_dim,
            _IMAGENET21K_CLASSES,
            representation_size=width,
            dtype="bfloat16",
            scan_layers=True,
        )
        config.data.image_size = 224
        config.data.batch_size = 4096
        config.data.random_crop = True
        config.data.random_flip = True
        config.optim.lr = 1e-3
        config.optim.b2 = 0.999
        config.optim.weight_decay = 0.03
        config.optim.warmup_steps = 10_000
        config.optim.schedule = "cosine"
        config.train.steps = 90 * 14_200_000 // 4096
        config.train.eval_every = 10_000
        config.train.ckpt_every = 5_000
    else:
        raise ValueError(f"unknown vit variant {arg!r}; choose tiny, b16, l16 or h14")
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict(
        dict(val=dict(kinds=("accuracy",), split="validation", num_examples=1024))
    )
    return config


def get_sweep(arg: str | None = "tiny") -> list[dict]:
    """Override dicts for `launch/sweep.py --config configs/vit.py:<arg>`, one run each.

    tiny: learning rate x weight decay; published sizes: the learning rate around 1e-3.
    """
    arg = arg or "tiny"
    if arg == "tiny":
        return [
            {"optim.lr": lr, "optim.weight_decay": wd} for lr in (5e-4, 1e-3, 2e-3) for wd in (0.0, 0.05)
        ]
    if arg in _PUBLISHED:
        return [{"optim.lr": lr} for lr in (5e-4, 1e-3, 2e-3)]
    raise ValueError(f"unknown vit variant {arg!r}; choose tiny, b16, l16 or h14")
