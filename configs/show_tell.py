"""Show and Tell (Vinyals et al. 2015): a CNN image embedding fed once to an LSTM captioner.

    vlm-jax train --config configs/show_tell.py:tiny --workdir runs/show_tell

Variants: tiny (CPU, the built-in world, two stages), tiny_inject, published (the paper's sizes:
embedding and LSTM 512, beam search of 20; the paper's GoogLeNet is replaced by a ResNet-50-style
tower, frozen).

tiny follows the paper's recipe at the world's scale: the LSTM reads a CNN trained for something
else and kept fixed. Stage "encoder" trains the tiny CLIP (configs/clip.py:tiny, 600 steps, its
SmallCNN image tower is the captioner's encoder); stage "caption" loads that tower as `encoder`
(train.init_from_map "encoder:image"), freezes it and trains Show and Tell on top (image once, at
t = -1, batch-normalised). Trained from scratch end to end instead, the image-once LSTM does not
learn to use the image within a CPU budget: 500 steps reach the caption prior (one caption for
every image) and 1500 steps with a batch-normalised embedding only NLL 0.74; its encoder collapses
to a constant. tiny_inject keeps the from-scratch encoder and feeds the image embedding beside
every word instead (image_input every_step, the par-inject captioners of Mao et al. and Donahue et
al.), which learns in 500 steps.
"""

import os

import ml_collections

from vlm_jax.config_defaults import base_config, default_mesh_and_rules, encoder_then_caption_stages


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(dict(name="caption", pad_id=0))
    if arg in ("tiny", "tiny_inject"):
        config.model = ml_collections.ConfigDict(
            dict(
                name="show_tell",
                vocab_size=512,
                embed_dim=128,
                hidden=256,
                dropout=0.0,
                # tiny_inject: the image embedding (batch-normalised) beside every word instead of
                # once at t = -1; see the module docstring.
                image_norm="batch",
                image_input="every_step" if arg == "tiny_inject" else "once",
                dtype="float32",
                # SmallCNN; pool "flatten" keeps where things are (the world's captions say so).
                # tiny: the tiny CLIP's image tower (output 128), pretrained in stage "encoder".
                encoder=dict(kind="cnn", channels=(32, 64, 128, 128), norm="layer", pool="flatten",
                             output_dim=128 if arg == "tiny" else 256, freeze=arg == "tiny"),
            )
        )
        config.decode = ml_collections.ConfigDict(dict(method="beam", beam_size=3, max_new_tokens=19))
        config.data.image_size = 32
        config.data.text_length = 20  # the world's longest caption is 18 tokens with bos/eos
        config.tokenizer.vocab_size = 512
        config.data.batch_size = 64
        config.optim.lr = 2e-3
        config.optim.weight_decay = 0.0
        config.optim.warmup_steps = 50
        config.train.steps = 500
        config.train.log_every = 50
        config.train.eval_every = 250
        config.train.ckpt_every = 250
        if arg == "tiny":
            clip = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip.py")
            config.stages = encoder_then_caption_stages(f"{clip}:tiny", steps=600)
    elif arg == "published":
        config.model = ml_collections.ConfigDict(
            dict(
                name="show_tell",
                vocab_size=10000,
                embed_dim=512,
                hidden=512,
                dropout=0.5,
                dtype="float32",
                # An ImageNet-pretrained tower (train.init_from), kept fixed as in the paper's
                # first phase; set freeze False to fine-tune it.
                encoder=dict(kind="resnet", layers=(3, 4, 6, 3), width=64, heads=32, output_dim=2048,
                             freeze=True),
            )
        )
        config.decode = ml_collections.ConfigDict(dict(method="beam", beam_size=20, max_new_tokens=32))
        config.data.image_size = 224
        config.data.text_length = 32
        # COCO with Karpathy's splits (dataset_coco.json from cs.stanford.edu/people/karpathy/deepimagesent):
        # train + restval (113,287 images) to train, val (5,000) evaluated during training, test (5,000)
        # with `vlm-jax eval --config.evals.val.split=test`.
        config.data.source = "karpathy"
        config.data.path = ""  # path to dataset_coco.json
        config.data.image_root = ""  # folder holding train2014/ and val2014/
        config.data.karpathy_restval = True  # False: train on the 82,783 'train' images alone
        config.data.random_crop = True
        config.data.random_flip = True
        config.tokenizer.vocab_size = 10000
        config.data.batch_size = 128
        config.optim.lr = 2e-4
        config.optim.weight_decay = 0.0
        config.optim.clip_norm = 5.0
        config.optim.warmup_steps = 1000
        config.train.steps = 300_000
        config.train.eval_every = 10_000
    else:
        raise ValueError(f"unknown show_tell variant {arg!r}; choose tiny, tiny_inject or published")
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    config.evals = ml_collections.ConfigDict()
    if arg in ("tiny", "tiny_inject"):
        # Held-out captions (beam 3) with the nearest-training-image caption as the baseline.
        config.evals.val = ml_collections.ConfigDict(
            dict(
                kinds=("caption",), split="validation", num_examples=500, method="beam", beam_size=3,
                max_new_tokens=19, batch_size=128, baseline=True,
            )
        )
    else:
        # The Karpathy val split (beam 20), with the nearest-training-image caption as the baseline.
        config.evals.val = ml_collections.ConfigDict(
            dict(
                kinds=("caption",), split="validation", num_examples=5000, method="beam", beam_size=20,
                max_new_tokens=32, batch_size=128, baseline=True,
            )
        )
    return config
