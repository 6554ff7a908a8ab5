"""The config sections every family shares: data, tokenizer, optimiser, training loop, mesh."""

from __future__ import annotations

import ml_collections

# Logical axis -> mesh axes, first match wins; a mesh axis already used in a spec is skipped, so
# activations ('batch' on data+fsdp) fall through to the later rules for their other dims.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("patch", None),
    ("codebook", None),
    # Conv kernels' input channels stay whole, so under fsdp a conv kernel is replicated (RN50's
    # towers: params 31% per device at fsdp=8 instead of 13%). Split over fsdp, XLA (jaxlib 0.10.2)
    # compiled wrong gradients for a conv stack on an fsdp-split batch; see
    # tests/parallel/test_mesh_rules.py::test_conv_kernels_split_over_an_axis_that_splits_the_batch.
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("classes", None),
)


def default_mesh_and_rules():
    """Pure data parallel over all devices; rules ready for fsdp/tensor when the mesh asks."""
    mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return mesh, [list(r) for r in DEFAULT_RULES]


def encoder_then_caption_stages(encoder_spec: str, steps: int = 600) -> ml_collections.ConfigDict:
    """config.stages of a captioner that reads a pretrained image tower: stage "encoder" runs the
    config `encoder_spec` (e.g. "<configs>/clip.py:tiny") for `steps`; stage "caption" (the base
    config) loads that run's image tower as its `encoder` (train.init_from_map "encoder:image")."""
    return ml_collections.ConfigDict(
        dict(
            order=("encoder", "caption"),
            encoder=dict(config=encoder_spec, train=dict(steps=steps, eval_every=steps, ckpt_every=steps)),
            caption=dict(train=dict(init_from_map="encoder:image")),
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """Defaults that a family config then fills in (model, task, evals)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(
            # world | coco | karpathy | jsonl; text only: world_text | world_instruct | alpaca
            source="world",
            # coco: annotations json; karpathy: dataset_coco.json / dataset_flickr30k.json (one
            # file, all splits; 'train' = train + restval unless data.karpathy_restval is False);
            # jsonl: the .jsonl file; alpaca: .json / .jsonl. '{split}' becomes the split name.
            path="",
            eval_path="",  # alpaca: the evaluation items
            image_root="",  # folder the image paths are relative to
            karpathy_restval=True,  # karpathy: the 'train' split includes restval
            tfds_data_dir="",  # '' -> ~/.cache/vlm_jax/tfds
            world_seed=0,
            world_num_examples=dict(train=50000, validation=2000, test=2000),
            image_size=32,
            text_length=16,
            batch_size=128,
            shuffle=True,
            random_crop=False,  # random resized crop (scale 0.8-1) on training images
            random_flip=False,
            # Contrastive tasks: each image also gets a wrong caption of its own as an extra
            # negative (the world's attribute-swapped captions; NegCLIP-style hard negatives).
            hard_negatives=False,
            # Language models: several examples per row, each its own segment (attention and loss
            # stay inside it); instruction tuning: the loss on the prompt too, not only the response.
            packing=False,
            train_on_prompt=False,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            max_bad_fraction=0.01,  # the run fails if more examples than this are unusable
            num_workers=0,
        )
    )
    config.tokenizer = ml_collections.ConfigDict(
        # path '' -> trained on the world's text, kept in workdir; model_type "bpe" or "char".
        # kind "clip_bpe": CLIP's byte-level BPE from the folder at path (vocab.json + merges.txt).
        dict(path="", vocab_size=512, model_type="bpe", kind="sentencepiece")
    )
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            warmup_steps=100,
            schedule="cosine",  # cosine | constant
            min_lr_ratio=0.0,
            clip_norm=1.0,  # 0 disables
            accum_steps=1,
            # A regex over param paths ('layers_0/attn/query/kernel'): only matching params train
            # (the rest are frozen, without optimiser state). '' trains everything. LoRA overrides.
            trainable="",
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            log_every=50,
            eval_every=500,
            ckpt_every=500,
            keep_checkpoints=2,
            async_checkpoints=True,
            progress=True,
            # Params to start from: another run's workdir (its latest checkpoint) or a
            # `vlm-jax convert` output. Only the params are taken, not the optimiser or the data.
            init_from="",
            # 'ours:theirs,...': load only these param subtrees from init_from, each from the
            # source's subtree of the other name (e.g. 'encoder:image': a CLIP run's image tower
            # as a captioner's encoder); '' loads every param.
            init_from_map="",
            # More sources, each 'SOURCE=ours:theirs,...' (SOURCE a run's workdir, or in a run of
            # stages 'stage:<name>'), loaded after init_from: e.g. a DALL-E transformer takes its
            # tokenizer from init_from and a CLIP's text tower from 'stage:clip'.
            init_also=(),
        )
    )
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    return config
