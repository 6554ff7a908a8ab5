"""The JAX sections of the GPU report, each run in a child process by vlm_jax.bench.gpu: the device
probe, the kernel table, and ours / plain JAX for the LLaMA and CLIP train steps and decode.

Each takes the parsed command line and returns a JSON-able dict. Everything runs on the first
device only (the peers are single-device; on a multi-GPU machine this is a per-GPU figure).
"""

from __future__ import annotations

import argparse
import platform
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import models, tasks
from vlm_jax.bench import gpu_workloads as workloads
from vlm_jax.bench import kernels, lm, plain_clip, plain_llama
from vlm_jax.bench import train as bench_train
from vlm_jax.bench.common import time_with_losses, trainer_step
from vlm_jax.bench.plain_common import param_count, timed_train
from vlm_jax.kernels.attention import choose_impl
from vlm_jax.plan import jaxpr_flops


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """The device and versions, as JAX sees them."""
    del args
    import jaxlib

    device = jax.devices()[0]
    return dict(platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version())


def _kernel_table(args: argparse.Namespace, only: str) -> dict[str, Any]:
    """bench.kernels' run and table for one of its sections."""
    size = workloads.sizes(args)
    argv = ["--only", only, "--repeats", str(size["kernel_repeats"]), "--warmup", str(size["kernel_warmup"])]
    argv += ["--small"] * args.small + ["--interpret"] * args.interpret
    result = kernels.run(kernels.build_parser().parse_args(argv))
    statuses = [r["status"] for r in result["rows"]]
    return dict(table=kernels.format_table(result), header=result["header"], ratios=result["ratios"],
                rows=result["rows"], counts={s: statuses.count(s) for s in sorted(set(statuses))})


def kernels_vq(args: argparse.Namespace) -> dict[str, Any]:
    """The VQ nearest-code lookup: ours (fused) against XLA's matmul + argmin."""
    return _kernel_table(args, "vq")


def kernels_attention(args: argparse.Namespace) -> dict[str, Any]:
    """Attention TFLOP/s: ours against XLA, cuDNN and JAX's Pallas mha."""
    return _kernel_table(args, "attention")


def _auto_attention(b: int, t: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
                    causal: bool = False, segments: bool = False) -> str:
    """The implementation vlm_jax.kernels.attention(impl="auto") picks for such a call here."""
    q = jax.ShapeDtypeStruct((b, t, int(heads), int(head_dim)), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((b, t, int(kv_heads), int(head_dim)), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
    return choose_impl(q, kv, kv, causal=causal, segment_ids=seg)


def _ours_details(config: Any, model: str, attention: str) -> dict[str, str]:
    """The descriptive fields of our step's result (attention: what `auto` picked)."""
    cfg, optim = config.model, config.optim
    return dict(name=f"vlm_jax {model}, the trainer's jitted step (jax {jax.__version__})",
                attention=f"vlm_jax.kernels.attention auto -> {attention}",
                compute=f"{cfg.dtype}, scan_layers {cfg.scan_layers}, remat {cfg.remat}",
                optimizer=f"optax {optim.name} + clip {optim.clip_norm:g} (the trainer's chain)",
                device=jax.devices()[0].device_kind)


def _first_device() -> list[jax.Device]:
    return jax.devices()[:1]


def _forward_flops(fn: Any, *abstract_args: Any) -> float:
    """Matmul FLOPs of fn(*args), counted on its jaxpr (no compile, no memory)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*abstract_args))[0]


def _llama_flops(config: Any, non_embedding: int, length: int) -> float:
    cfg = config.model
    width = int(cfg.heads) * int(cfg.head_dim or cfg.width // cfg.heads)
    return float(lm.flops_per_token(non_embedding, int(cfg.depth), width, length, causal=True))


def _llama_tokens(args: argparse.Namespace, config: Any) -> np.ndarray:
    size = workloads.sizes(args)
    return lm.random_tokens(int(config.model.vocab_size), (size["llama_batch"], size["llama_length"]),
                            int(config.seed))


def llama_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our trainer's jitted LLaMA step (bf16, scan_layers, remat dots), tokens/s."""
    config, size = workloads.llama_config(args), workloads.sizes(args)
    tokens = _llama_tokens(args, config)
    model = models.build(config)
    counts = lm.param_counts(model)
    one_step, _, _ = trainer_step(config, model, tasks.get("lm"), lm.lm_batch(tokens), _first_device())
    timing = time_with_losses(one_step, size["steps"], size["warmup"])
    cfg = config.model
    b, t = tokens.shape
    # The lm task passes segment ids (packed rows), which decides the kernel.
    impl = _auto_attention(b, t, int(cfg.heads), int(cfg.kv_heads), int(cfg.head_dim or cfg.width // cfg.heads),
                           cfg.dtype, causal=True, segments=True)
    return workloads.train_result(
        "ours", timing, size, tokens.size, "tokens", counts["total"],
        _llama_flops(config, counts["non_embedding"], t),
        **_ours_details(config, "Llama", f"{impl} (with segment ids)"))


def llama_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The plain-JAX LLaMA (plain_llama): scan, remat saving dots, cuDNN attention on a GPU."""
    config, size = workloads.llama_config(args), workloads.sizes(args)
    sizes = plain_llama.Sizes.from_config(config.model)
    tokens = jnp.asarray(_llama_tokens(args, config))
    params = jax.jit(plain_llama.init_params, static_argnums=0)(sizes, jax.random.key(int(config.seed)))
    dtype = jnp.dtype(config.model.dtype)
    impls = ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)

    def loss_of(impl: str | None) -> Any:
        return lambda p, batch: plain_llama.loss(p, batch, sizes, dtype=dtype, impl=impl)

    total = param_count(params)  # Before the step donates them.
    timing = timed_train(loss_of, impls, params, tokens, config.optim, size["steps"], size["warmup"])
    return workloads.train_result(
        "plain", timing, size, tokens.size, "tokens", total,
        _llama_flops(config, total - sizes.vocab * sizes.width, tokens.shape[1]),
        name="plain-JAX LLaMA (vlm_jax.bench.plain_llama): lax.scan, jax.checkpoint saving dots",
        attention=f"jax.nn.dot_product_attention {timing['attention_impl']}",
        compute=f"{dtype.name}, lax.scan, remat dots", optimizer="optax clip + adamw",
        device=jax.devices()[0].device_kind)


def _clip_batch(args: argparse.Namespace, config: Any) -> dict[str, np.ndarray]:
    return bench_train.random_batch(config, workloads.sizes(args)["clip_batch"], seed=int(config.seed))


def _clip_abstract_inputs(config: Any) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """One image-text pair, abstractly: the FLOPs per pair."""
    size, length = int(config.data.image_size), int(config.data.text_length)
    return (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((1, length), jnp.int32))


def clip_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our trainer's jitted CLIP step, images/s; FLOPs from our forward's jaxpr."""
    config, size = workloads.clip_config(args), workloads.sizes(args)
    batch = _clip_batch(args, config)
    model = models.build(config)
    one_step, abstract, _ = trainer_step(config, model, tasks.get(config.task.name), batch, _first_device())
    timing = time_with_losses(one_step, size["steps"], size["warmup"])
    image, text = _clip_abstract_inputs(config)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(image.shape),
                                                         jnp.zeros(text.shape, jnp.int32))["params"]))
    flops = _forward_flops(lambda p, i, t: model.apply({"params": p}, i, t), shapes, image, text)
    cfg, b = config.model, len(batch["image"])
    towers = (("image", cfg.image, (cfg.image.image_size // cfg.image.patch_size) ** 2 + 1, False),
              ("text", cfg.text, int(config.data.text_length), True))
    attention = [f"{_auto_attention(b, t, c.heads, c.heads, c.width // c.heads, cfg.dtype, causal)} ({name})"
                 for name, c, t, causal in towers]
    return workloads.train_result(
        "ours", timing, size, b, "images", param_count(abstract["params"]), 3 * flops,
        forward_flops_per_pair=flops, **_ours_details(config, "CLIP", ", ".join(attention)))


def clip_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The plain-JAX CLIP (plain_clip): scan, remat saving dots, JAX's default attention."""
    config, size = workloads.clip_config(args), workloads.sizes(args)
    sizes = plain_clip.Sizes.from_config(config.model)
    batch = {k: jnp.asarray(v) for k, v in _clip_batch(args, config).items()}
    params = jax.jit(plain_clip.init_params, static_argnums=0)(sizes, jax.random.key(int(config.seed)))
    dtype = jnp.dtype(config.model.dtype)

    def loss_of(impl: str | None) -> Any:
        return lambda p, b: plain_clip.loss(p, b, sizes, dtype=dtype, impl=impl)

    image, text = _clip_abstract_inputs(config)
    flops = _forward_flops(
        lambda p, i, t: (plain_clip.encode_image(p, i, sizes, dtype=dtype),
                         plain_clip.encode_text(p, t, sizes, dtype=dtype)),
        jax.eval_shape(lambda: params), image, text)
    total = param_count(params)  # Before the step donates them.
    timing = timed_train(loss_of, (None,), params, batch, config.optim, size["steps"], size["warmup"])
    return workloads.train_result(
        "plain", timing, size, len(batch["image"]), "images", total, 3 * flops,
        forward_flops_per_pair=flops,
        name="plain-JAX CLIP (vlm_jax.bench.plain_clip): lax.scan, jax.checkpoint saving dots",
        attention=f"jax.nn.dot_product_attention {timing['attention_impl']}",
        compute=f"{dtype.name}, lax.scan, remat dots", optimizer="optax clip + adamw",
        device=jax.devices()[0].device_kind)


def decode_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy batch-1 decode of our LLaMA in bf16 with the KV cache (and without, for reference)."""
    config, size = workloads.llama_config(args), workloads.sizes(args)
    prompt = lm.random_tokens(int(config.model.vocab_size), (1, size["decode_prompt"]), int(config.seed) + 1)
    result = lm.bench_ours_decode(config, prompt, size["decode_tokens"], size["decode_repeats"])
    return dict(result, impl="ours", batch=1, prompt_length=size["decode_prompt"],
                new_tokens=size["decode_tokens"], repeats=size["decode_repeats"],
                name="vlm_jax Llama: jitted prefill + lax.fori_loop over the KV cache",
                device=jax.devices()[0].device_kind)
