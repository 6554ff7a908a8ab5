"""Train-step throughput of our jitted CLIP step beside a PyTorch peer of the same sizes, same CPU.

    python -m vlm_jax.bench.train --config configs/clip.py:tiny [--steps 20] [--warmup 3]
        [--batch-size 128] [--peer auto|none] [--config.model.text.depth=4 ...]

Peers (float32, same batch, same loss, AdamW, forward + backward + optimiser step): image kind
"vit" -> Hugging Face CLIPModel; "cnn" -> HF CLIPTextModelWithProjection + a torch mirror of our
SmallCNN; "resnet" -> open_clip's ModifiedResNet CLIP (only when open_clip is installed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import models, tasks
from vlm_jax.bench.common import (
    PeerSkipped, describe_optimizer, import_torch, load_average, load_note, num_cores, time_steps,
    torch_optimizer, torch_threads, torch_train_step, trainer_step,
)
from vlm_jax.layers.transformer import mlp_dim_from

# Our activation names -> Hugging Face's ACT2FN names.
_HF_ACTS = dict(gelu="gelu", gelu_tanh="gelu_pytorch_tanh", quick_gelu="quick_gelu", relu="relu",
                silu="silu", tanh="tanh")


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0) -> dict:
    """{'image' f32 [B,S,S,3], 'tokens' i32 [B,L]} with one eos per row, pads after it; plus
    'negative_tokens' i32 [B,L] alike when the config trains with hard negatives."""
    batch = _random_batch(config, batch_size, seed)
    if config.data.get("hard_negatives", False):
        batch["negative_tokens"] = _random_batch(config, batch_size, seed + 1)["tokens"]
    return batch


def _random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    size, length = int(config.data.image_size), int(config.data.text_length)
    text = config.model.text
    vocab, eos, pad = int(text.vocab_size), int(text.eos_id), int(text.get("pad_id", 0))
    if not 0 <= eos < vocab:
        raise config_lib.ConfigError(f"model.text.eos_id {eos} is not in the vocabulary ({vocab})")
    if length > int(text.context_length):
        raise config_lib.ConfigError(
            f"data.text_length {length} exceeds model.text.context_length {text.context_length}"
        )
    images = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
    # Draw from the vocabulary less eos, so the only eos of a row is the one placed below.
    tokens = rng.integers(0, vocab - 1, (batch_size, length))
    tokens[tokens >= eos] += 1
    eos_at = rng.integers(1, length, batch_size) if length > 1 else np.zeros(batch_size, int)
    columns = np.arange(length)[None, :]
    tokens = np.where(columns > eos_at[:, None], pad, tokens)
    tokens[np.arange(batch_size), eos_at] = eos
    return {"image": images, "tokens": tokens.astype(np.int32)}


def _group(name: str) -> str:
    head = name.split(".")[0].split("/")[0]
    if head in ("logit_scale", "logit_bias"):
        return "other"
    if head.startswith(("image", "vision", "visual")):
        return "image"
    return "text"


def _param_groups(named_sizes: Sequence[tuple[str, int]]) -> dict[str, int]:
    counts = {"image": 0, "text": 0, "other": 0}
    for name, size in named_sizes:
        counts[_group(name)] += size
    counts["total"] = sum(counts.values())
    return counts


def bench_ours(
    config: ml_collections.ConfigDict, batch: dict, steps: int, warmup: int,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Times our train step, built and jitted exactly as vlm_jax.train.trainer builds it."""
    model = models.build(config)
    one_step, abstract, mesh = trainer_step(config, model, tasks.get(config.task.name), batch, devices)
    timing = time_steps(one_step, steps, warmup)
    named = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    sizes = [(jax.tree_util.keystr(path, simple=True, separator="/"), math.prod(leaf.shape))
             for path, leaf in named]
    return dict(
        timing,
        name=f"vlm_jax {config.model.image.kind} CLIP (JAX {jax.__version__})",
        examples_per_s=len(batch["image"]) / timing["median_step_s"],
        params=_param_groups(sizes),
        where=f"{mesh.size} {mesh.devices.flat[0].platform}, {num_cores()} cores",
        mesh=dict(mesh.shape),
        dtype=str(config.model.get("dtype", "float32")),
    )


# The PyTorch peer: torch, transformers and open_clip are optional, so imported lazily.


def _hf_text_config(config: ml_collections.ConfigDict) -> Any:
    from transformers import CLIPTextConfig

    text = config.model.text
    return CLIPTextConfig(
        vocab_size=int(text.vocab_size), hidden_size=int(text.width),
        intermediate_size=mlp_dim_from(text), projection_dim=int(config.model.embed_dim),
        num_hidden_layers=int(text.depth), num_attention_heads=int(text.heads),
        max_position_embeddings=int(text.context_length), hidden_act=_hf_act(text.act),
        layer_norm_eps=float(text.get("ln_eps", 1e-5)), pad_token_id=int(text.get("pad_id", 0)),
        eos_token_id=int(text.eos_id), bos_token_id=None,
    )


def _hf_act(name: str) -> str:
    if name not in _HF_ACTS:
        raise PeerSkipped(f"activation {name!r} has no Hugging Face counterpart")
    return _HF_ACTS[name]


def build_hf_clip(config: ml_collections.ConfigDict) -> tuple[Any, Callable, str]:
    """(HF CLIPModel of our ViT CLIP's sizes, loss_of(images [B, 3, S, S], tokens [B, L]) -> our
    InfoNCE, its name); built on torch's default device."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    image = config.model.image
    # HF CLIP's vision tower is fixed: class token, ln_pre, no patch bias, qkv bias, ln_post on
    # the class token. Anything else would time a different architecture.
    wanted = dict(pool="cls", class_token=True, pre_norm=True, patch_bias=False, qkv_bias=True,
                  final_norm=True, representation_size=0)
    defaults = dict(class_token=True, qkv_bias=True, final_norm=True, representation_size=0,
                    pool="cls", pre_norm=False, patch_bias=True)
    differ = [k for k, v in wanted.items() if image.get(k, defaults[k]) != v]
    if differ:
        raise PeerSkipped(f"HF CLIP's vision tower differs from ours in {differ}")
    if int(image.image_size) != int(config.data.image_size):
        raise config_lib.ConfigError(
            f"model.image.image_size {image.image_size} != data.image_size {config.data.image_size}"
        )
    vision = CLIPVisionConfig(
        hidden_size=int(image.width), intermediate_size=mlp_dim_from(image),
        projection_dim=int(config.model.embed_dim), num_hidden_layers=int(image.depth),
        num_attention_heads=int(image.heads), image_size=int(image.image_size),
        patch_size=int(image.patch_size), hidden_act=_hf_act(image.get("act", "gelu")),
        layer_norm_eps=float(image.get("ln_eps", 1e-6)),
    )
    hf_config = CLIPConfig(
        text_config=_hf_text_config(config), vision_config=vision,
        projection_dim=int(config.model.embed_dim),
        logit_scale_init_value=float(config.model.logit_scale_init),
    )
    model = CLIPModel(hf_config)

    def loss_of(images: Any, tokens: Any) -> Any:
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=tokens)
        return _info_nce(_features(image), _features(text), model.logit_scale.exp())

    attn = model.config._attn_implementation
    return model, loss_of, f"HF transformers CLIPModel ({attn})"


def _features(out: Any) -> Any:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return out if hasattr(out, "norm") else out.pooler_output


def _info_nce(image_features: Any, text_features: Any, logit_scale: Any) -> Any:
    """Symmetric InfoNCE of unnormalised torch features, as tasks.contrastive.softmax_loss.

    Text rows beyond the B images are hard negatives: in the image->text softmax only.
    """
    import torch
    import torch.nn.functional as F

    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T  # [B, B (+ negatives)]
    labels = torch.arange(len(logits))
    t2i = F.cross_entropy(logits[:, : len(logits)].T, labels)
    return 0.5 * (F.cross_entropy(logits, labels) + t2i)


def _build_cnn_clip(config: ml_collections.ConfigDict) -> tuple[Any, Callable, str]:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPTextModelWithProjection

    image = config.model.image
    channels = tuple(int(c) for c in image.get("channels", (32, 64, 128, 128)))
    norm = image.get("norm", "layer")
    pool = image.get("pool", "mean")
    grid = (int(config.data.image_size) // 2 ** len(channels)) ** 2
    # models.clip builds the CNN with output_dim = embed_dim.
    output_dim = int(config.model.embed_dim)

    class TorchSmallCNN(torch.nn.Module):
        """Layer-for-layer mirror of vlm_jax.models.resnet.SmallCNN."""

        def __init__(self) -> None:
            super().__init__()
            self.convs, self.norms = torch.nn.ModuleList(), torch.nn.ModuleList()
            c_in = 3
            for c in channels:
                self.convs.append(torch.nn.Conv2d(c_in, c, 3, padding=1, bias=norm == "none"))
                self.norms.append(torch.nn.LayerNorm(c, eps=1e-5) if norm == "layer" else
                                  torch.nn.Identity())
                c_in = c
            self.proj = torch.nn.Linear(c_in * grid if pool == "flatten" else c_in, output_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for conv, layer_norm in zip(self.convs, self.norms):
                # Our LayerNorm is over channels only; on a channels_last tensor this permute
                # is free, so torch is not charged for a layout copy.
                x = layer_norm(conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                x = F.max_pool2d(F.relu(x), 2)
            if pool == "flatten":  # In our NHWC order, so the projection sees the same features.
                return self.proj(x.permute(0, 2, 3, 1).flatten(1))
            return self.proj(x.mean(dim=(2, 3)))

    class CnnClip(torch.nn.Module):
        """Torch SmallCNN image tower + HF CLIP text tower + a learnable temperature."""

        def __init__(self) -> None:
            super().__init__()
            self.image = TorchSmallCNN().to(memory_format=torch.channels_last)
            self.text = CLIPTextModelWithProjection(_hf_text_config(config))
            init = torch.tensor(float(config.model.logit_scale_init))
            self.logit_scale = torch.nn.Parameter(init)

    model = CnnClip()

    def loss_of(images: Any, tokens: Any) -> Any:
        return _info_nce(model.image(images), model.text(input_ids=tokens).text_embeds,
                         model.logit_scale.exp())

    attn = model.text.config._attn_implementation
    return model, loss_of, f"torch SmallCNN mirror + HF CLIPTextModelWithProjection ({attn})"


def _build_open_clip_resnet(config: ml_collections.ConfigDict) -> tuple[Any, Callable, str]:
    try:
        import open_clip
    except ImportError as e:
        raise PeerSkipped(f"the ResNet peer needs open_clip (pip install open_clip_torch): {e}")
    image, text = config.model.image, config.model.text
    if text.act not in ("gelu", "quick_gelu"):
        raise PeerSkipped(f"open_clip's text tower has no {text.act!r} activation")
    width, heads = int(image.get("width", 64)), int(image.get("heads", 32))
    vision_cfg = dict(
        layers=[int(n) for n in image.get("layers", (3, 4, 6, 3))], width=width,
        # open_clip derives the attention-pool heads as width * 32 // head_width.
        head_width=width * 32 // heads, image_size=int(config.data.image_size), patch_size=None,
    )
    text_cfg = dict(
        context_length=int(text.context_length), vocab_size=int(text.vocab_size),
        width=int(text.width), heads=int(text.heads), layers=int(text.depth),
        mlp_ratio=mlp_dim_from(text) / int(text.width), pad_id=int(text.get("pad_id", 0)),
        eos_id=int(text.eos_id), pool_type="eos",
    )
    # The registered name only seeds create_model; every field comes from our config.
    model = open_clip.create_model(
        "RN50", pretrained=None, embed_dim=int(config.model.embed_dim), vision_cfg=vision_cfg,
        text_cfg=text_cfg, quick_gelu=text.act == "quick_gelu", output_dict=True,
        init_logit_scale=float(config.model.logit_scale_init),
    )

    def loss_of(images: Any, tokens: Any) -> Any:
        out = model(images, tokens)
        return _info_nce(out["image_features"], out["text_features"], out["logit_scale"])

    return model, loss_of, f"open_clip {open_clip.__version__} ModifiedResNet CLIP"


def bench_peer(
    config: ml_collections.ConfigDict, batch: dict, steps: int, warmup: int
) -> dict[str, Any]:
    """Times a PyTorch CLIP of the same sizes; raises PeerSkipped when it cannot be built."""
    torch, transformers = import_torch()
    if config.model.get("loss", "softmax") != "softmax":
        raise PeerSkipped(f"the peers train the softmax loss only, not {config.model.loss!r}")
    builders = {"vit": build_hf_clip, "cnn": _build_cnn_clip, "resnet": _build_open_clip_resnet}
    kind = config.model.image.kind
    if kind not in builders:
        raise PeerSkipped(f"no peer for image kind {kind!r}")
    with torch_threads() as threads:
        torch.manual_seed(int(config.seed))
        model, loss_of, name = builders[kind](config)
        model.float().train()
        # NHWC numpy -> NCHW view with channels_last strides; the CNN peer runs in that layout.
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        if kind != "cnn":
            images = images.contiguous()
        # Negatives ride along as extra text rows, as in our task (one text-tower call).
        tokens = torch.from_numpy(
            np.concatenate([batch["tokens"], batch["negative_tokens"]]) if "negative_tokens" in batch
            else batch["tokens"]
        ).long()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch_optimizer(params, config.optim)
        one_step = torch_train_step(lambda: loss_of(images, tokens), params, opt,
                                    config.optim.clip_norm)
        timing = time_steps(one_step, steps, warmup)
    return dict(
        timing,
        name=f"{name}; torch {torch.__version__}, transformers {transformers.__version__}",
        examples_per_s=len(batch["image"]) / timing["median_step_s"],
        params=_param_groups([(n, p.numel()) for n, p in model.named_parameters()]),
        where=f"torch, {threads} threads",
        optimizer=describe_optimizer(opt),
        dtype="float32",
    )


def run(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    peer: str = "auto",
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Benchmarks ours on `devices` (default all) and the peer unless peer == 'none'."""
    if steps < 1 or warmup < 0:
        raise config_lib.ConfigError("--steps must be >= 1 and --warmup >= 0")
    batch_size = int(batch_size or config.data.batch_size)
    batch = random_batch(config, batch_size, seed=int(config.seed))
    result: dict[str, Any] = dict(
        load_before=load_average(), cores=num_cores(),
        config=config.get("config_spec", "?"), batch_size=batch_size, steps=steps, warmup=warmup,
        image_size=int(config.data.image_size), text_length=int(config.data.text_length),
        image_kind=config.model.image.kind, peer=None, peer_skipped=None, ratio=None,
        params_match=None,
    )
    result["ours"] = bench_ours(config, batch, steps, warmup, devices)
    if peer == "none":
        result["peer_skipped"] = "--peer none"
        return result
    try:
        result["peer"] = bench_peer(config, batch, steps, warmup)
    except PeerSkipped as e:
        result["peer_skipped"] = str(e)
        return result
    result["ratio"] = result["ours"]["examples_per_s"] / result["peer"]["examples_per_s"]
    result["params_match"] = result["ours"]["params"] == result["peer"]["params"]
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    ours, peer = result["ours"], result["peer"]
    lines = [
        f"train step, {result['config']}: {result['image_kind']} image tower, batch "
        f"{result['batch_size']}, images {result['image_size']}x{result['image_size']}x3, "
        f"{result['text_length']} tokens; median of {result['steps']} steps after "
        f"{result['warmup']} warmup",
        f"  ours: {ours['name']}, mesh {ours['mesh']}",
        "  peer: " + (f"{peer['name']}, {peer['optimizer']}" if peer
                      else f"skipped: {result['peer_skipped']}"),
    ]
    rows = [
        ("examples/s", lambda r: f"{r['examples_per_s']:.1f}"),
        ("median step (ms)", lambda r: f"{1e3 * r['median_step_s']:.1f}"),
        ("mean step (ms)", lambda r: f"{1e3 * r['mean_step_s']:.1f}"),
        ("first step (s)", lambda r: f"{r['first_step_s']:.2f}"),
        ("params image tower", lambda r: f"{r['params']['image']:,}"),
        ("params text tower", lambda r: f"{r['params']['text']:,}"),
        ("params other", lambda r: f"{r['params']['other']:,}"),
        ("params total", lambda r: f"{r['params']['total']:,}"),
        ("compute dtype", lambda r: r["dtype"]),
        ("devices/threads", lambda r: r["where"]),
    ]
    lines.append(f"{'':20s} {'ours':>14s}   {'peer':>14s}")
    for label, cell in rows:
        lines.append(f"{label:20s} {cell(ours):>14s}   {cell(peer) if peer else '-':>14s}")
    if peer:
        lines.append(f"ratio ours/peer (examples/s): {result['ratio']:.2f}x")
        lines.append("param counts match" if result["params_match"] else
                     "PARAM COUNTS DIFFER: the two models are not the same architecture")
        if ours["dtype"] != "float32":
            lines.append(f"note: ours computes in {ours['dtype']}, the peer in float32")
    note = load_note(result["load_before"], result["cores"])
    if note:
        lines.append(note)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m vlm_jax.bench.train` (after `--config.x=y` are split off)."""
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.bench.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/clip.py:tiny", help="path.py[:variant]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    parser.add_argument("--peer", choices=["auto", "none"], default="auto")
    parser.add_argument("--devices", type=int, default=None,
                        help="our mesh uses the first N devices (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses argv, runs the benchmark, prints the table and returns the result dict."""
    rest, overrides = config_lib.split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    config = config_lib.load(args.config, overrides)
    devices = jax.devices()[: args.devices] if args.devices else None
    result = run(config, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                 peer=args.peer, devices=devices)
    print(format_table(result), flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except config_lib.ConfigError as e:
        print(f"vlm_jax.bench.train: config error: {e}", file=sys.stderr)
        sys.exit(2)
