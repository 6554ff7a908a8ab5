"""Show, Attend and Tell (Xu et al. 2015): an LSTM captioner attending over a conv feature grid.

    vlm-jax train --config configs/show_attend_tell.py:tiny --workdir runs/sat

Variants: tiny (CPU, the built-in world, two stages), tiny_scratch (an 8x8x128 grid from a
3-stage VGG-style stack trained with the captioner), published (VGG-16 conv5_3: 14x14x512 at 224,
soft attention, gating scalar, lambda = 1). model.attention = "soft" | "hard" (hard: REINFORCE,
see tasks/caption.py).

tiny reads the same encoder as configs/show_tell.py:tiny, so the two compare like for like: stage
"encoder" trains the tiny CLIP (600 steps); stage "caption" loads its SmallCNN image tower, frozen,
attends over the tower's third stage before its pool (8x8x128; the paper's conv5_3 is likewise a
map before the last pool), starts h0/c0 from the tower's image vector (model.init_from "pooled")
and trains 500 steps, as Show and Tell's caption stage. Measured on the same encoder (held-out
CIDEr, 500 validation images; Show and Tell 2.98):
  - the doubly stochastic penalty off (lambda 0, tiny): 3.50, attention mass in the named
    object's box 8.2x its area share. The penalty asks every location to get a total attention of
    1 over the caption; with 64 locations and at most 19 steps, the words' attention must cover
    the background too: lambda 1 gives 3.44 and 3.2x (shape words 1.1x), lambda 0.1 3.46 and 4.3x.
  - h0/c0 from the mean annotation vector (the paper's): lambda 0 2.81 (8.1x); lambda 1 2.22
    (1000 steps 2.66, 1500 3.00; 3.7x): the grid alone is a weaker summary than the tower's image
    vector.
  - the last stage's 4x4 grid, lambda 1: 2.51 (mean), 3.24 (pooled); coarse cells (2.3x, 1.9x).
"""

import os

import ml_collections

from vlm_jax.config_defaults import base_config, default_mesh_and_rules, encoder_then_caption_stages


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(
        dict(
            name="caption",
            pad_id=0,
            # lambda of the doubly stochastic penalty (tiny: none, see the module docstring)
            attention_penalty=0.0 if arg == "tiny" else 1.0,
            # Hard attention only: REINFORCE weight, entropy bonus, moving-average baseline decay.
            reinforce_weight=1.0,
            entropy_weight=0.01,
            baseline_decay=0.9,
        )
    )
    if arg in ("tiny", "tiny_scratch"):
        if arg == "tiny":
            # The tiny CLIP's SmallCNN (stage "encoder"), frozen. Its third stage before the pool,
            # 8x8x128, is the annotation grid (the last stage's 4x4 cells are too coarse for the
            # world's objects); h0/c0 come from its image vector (see the module docstring).
            encoder = dict(kind="cnn", channels=(32, 64, 128, 128), norm="layer", pool="flatten",
                           output_dim=128, grid_stage=2, freeze=True)
        else:  # a VGG-style stack trained with the captioner: an 8x8x128 grid
            encoder = dict(kind="vgg", stages=((1, 32), (1, 64), (1, 128)), norm="layer", freeze=False)
        config.model = ml_collections.ConfigDict(
            dict(
                name="show_attend_tell",
                vocab_size=512,
                embed_dim=128,
                hidden=256,
                attn_dim=128,
                attention="soft",
                selector=True,  # the gating scalar beta
                # h0/c0 from: mean (of the annotation vectors, the paper) | pooled (the encoder's image vector)
                init_from="pooled" if arg == "tiny" else "mean",
                dropout=0.0,
                dtype="float32",
                encoder=encoder,
            )
        )
        config.decode = ml_collections.ConfigDict(dict(method="beam", beam_size=3, max_new_tokens=19))
        config.data.image_size = 32
        config.data.text_length = 20
        config.tokenizer.vocab_size = 512
        config.data.batch_size = 64
        config.optim.lr = 2e-3
        config.optim.weight_decay = 0.0
        config.optim.warmup_steps = 50
        # tiny: 500 caption steps as Show and Tell's (~1.5 min after the ~4 min CLIP stage on 2 CPU
        # cores); tiny_scratch also trains its encoder: 1000 steps, about 4 minutes.
        config.train.steps = 500 if arg == "tiny" else 1000
        config.train.log_every = 50
        config.train.eval_every = config.train.steps
        config.train.ckpt_every = 500
        if arg == "tiny":
            clip = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip.py")
            config.stages = encoder_then_caption_stages(f"{clip}:tiny", steps=600)
    elif arg == "published":
        config.model = ml_collections.ConfigDict(
            dict(
                name="show_attend_tell",
                vocab_size=10000,
                embed_dim=512,
                hidden=1000,  # the authors' code (arctic-captions) default
                attn_dim=512,
                attention="soft",
                selector=True,
                dropout=0.5,
                dtype="float32",
                # VGG-16 without its last pool: 224 -> 14x14x512 (L = 196, D = 512), ImageNet
                # weights (train.init_from), not fine-tuned.
                encoder=dict(kind="vgg", stages=((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
                             norm="none", freeze=True),
            )
        )
        config.decode = ml_collections.ConfigDict(dict(method="beam", beam_size=3, max_new_tokens=32))
        config.data.image_size = 224
        config.data.text_length = 32
        # COCO with Karpathy's splits (dataset_coco.json from cs.stanford.edu/people/karpathy/deepimagesent):
        # train + restval (113,287 images) to train, val (5,000) evaluated during training, test (5,000)
        # with `vlm-jax eval --config.evals.val.split=test`.
        config.data.source = "karpathy"
        config.data.path = ""  # path to dataset_coco.json
        config.data.image_root = ""  # folder holding train2014/ and val2014/
        config.data.karpathy_restval = True  # False: train on the 82,783 'train' images alone
        config.tokenizer.vocab_size = 10000
        config.data.batch_size = 64
        config.optim.lr = 1e-4
        config.optim.weight_decay = 0.0
        config.optim.clip_norm = 5.0
        config.optim.warmup_steps = 1000
        config.train.steps = 200_000
        config.train.eval_every = 10_000
    else:
        raise ValueError(f"unknown show_attend_tell variant {arg!r}; choose tiny, tiny_scratch or published")
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict()
    if arg in ("tiny", "tiny_scratch"):
        # Held-out captions (beam 3) with the nearest-training-image caption as the baseline, and
        # how much of each colour/shape word's attention falls on the object it names.
        config.evals.val = ml_collections.ConfigDict(
            dict(
                kinds=("caption",), split="validation", num_examples=500, method="beam", beam_size=3,
                max_new_tokens=19, batch_size=128, baseline=True, grounding=True,
            )
        )
    else:
        # The Karpathy val split (beam 3), with the nearest-training-image caption as the baseline.
        config.evals.val = ml_collections.ConfigDict(
            dict(
                kinds=("caption",), split="validation", num_examples=5000, method="beam", beam_size=3,
                max_new_tokens=32, batch_size=128, baseline=True,
            )
        )
    return config
