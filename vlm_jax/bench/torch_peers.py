"""The PyTorch sections of the GPU report, each run in a child process of its own by
vlm_jax.bench.gpu (JAX preallocates most of the GPU, so torch and JAX never share a process; the
parent runs these with JAX_PLATFORMS=cpu so nothing here can take the GPU from torch).

Hugging Face transformers models of the workloads' sizes, built directly on the device (CUDA when
torch sees one, else the CPU), sdpa attention, float32 params under torch.autocast bfloat16, the
torch AdamW of config.optim (fused where torch has it), clipping as our step. Decode: HF
generate, greedy, KV cache, bfloat16 params.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from vlm_jax.bench import gpu_workloads as workloads
from vlm_jax.bench import lm
from vlm_jax.bench import train as bench_train
from vlm_jax.bench.common import (
    describe_optimizer, import_torch, time_generate, time_with_losses, torch_optimizer, torch_threads,
    torch_train_step,
)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _where(device: str, threads: int) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {threads} threads"


def _versions() -> str:
    torch, transformers = import_torch()
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def _hf_llama(config: Any, device: str, dtype: Any) -> Any:
    """LlamaForCausalLM of our model section's sizes, sdpa attention, built on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_jax.convert.hf_llama import hf_config

    torch.manual_seed(int(config.seed))
    hf = LlamaConfig(**hf_config(config.model), attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(hf).to(dtype)


def _timed_train(model: Any, loss_of: Callable[[], Any], config: Any, device: str, size: dict[str, int]
                 ) -> dict[str, Any]:
    """Times loss_of under autocast bf16 + backward + clip + AdamW; the common result fields."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(params, config.optim)

    def autocast_loss() -> Any:
        # The torch.device context: factory calls inside the loss (labels) land on the device.
        with torch.device(device), torch.autocast(device_type=device, dtype=torch.bfloat16):
            return loss_of()

    one_step = torch_train_step(autocast_loss, params, opt, config.optim.clip_norm)
    sync = _sync(device)

    def step() -> Any:
        loss = one_step()
        sync()
        return loss

    timing = time_with_losses(step, size["steps"], size["warmup"])
    return dict(timing, optimizer=describe_optimizer(opt), compute=f"fp32 params, autocast bfloat16 ({device})",
                attention=f"sdpa ({model.config._attn_implementation})")


def llama_train(args: argparse.Namespace) -> dict[str, Any]:
    """HF LlamaForCausalLM(labels=tokens) train step, tokens/s."""
    torch, _ = import_torch()
    config, size = workloads.llama_config(args), workloads.sizes(args)
    device = _device()
    tokens = lm.random_tokens(int(config.model.vocab_size), (size["llama_batch"], size["llama_length"]),
                              int(config.seed))
    with torch_threads() as threads:
        model = _hf_llama(config, device, torch.float32).train()
        ids = torch.from_numpy(tokens).long().to(device)
        result = _timed_train(model, lambda: model(input_ids=ids, labels=ids).loss, config, device, size)
    total = sum(p.numel() for p in model.parameters())
    cfg = config.model
    width = int(cfg.heads) * int(cfg.head_dim or cfg.width // cfg.heads)
    flops = lm.flops_per_token(total - model.model.embed_tokens.weight.numel(), int(cfg.depth), width,
                               tokens.shape[1], causal=True)
    return workloads.train_result(
        "torch", result, size, tokens.size, "tokens", total, float(flops),
                                  name=f"HF LlamaForCausalLM; {_versions()}", device=_where(device, threads))


def clip_train(args: argparse.Namespace) -> dict[str, Any]:
    """HF CLIPModel of the same sizes, our InfoNCE (bench.train's peer), images/s."""
    torch, _ = import_torch()
    config, size = workloads.clip_config(args), workloads.sizes(args)
    device = _device()
    batch = bench_train.random_batch(config, size["clip_batch"], seed=int(config.seed))
    with torch_threads() as threads:
        torch.manual_seed(int(config.seed))
        with torch.device(device):
            model, loss_of, name = bench_train.build_hf_clip(config)
        if model.config._attn_implementation != "sdpa":
            model.set_attn_implementation("sdpa")
        model.float().train()
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
        ids = torch.from_numpy(batch["tokens"]).long().to(device)
        result = _timed_train(model, lambda: loss_of(images, ids), config, device, size)
    return workloads.train_result(
        "torch", result, size, len(images), "images", sum(p.numel() for p in model.parameters()),
                                  None, name=f"{name}; {_versions()}", device=_where(device, threads))


def llama_decode(args: argparse.Namespace) -> dict[str, Any]:
    """HF generate (greedy, KV cache) of a bf16 LlamaForCausalLM, batch 1, tokens/s."""
    torch, _ = import_torch()
    config, size = workloads.llama_config(args), workloads.sizes(args)
    device = _device()
    prompt = lm.random_tokens(int(config.model.vocab_size), (1, size["decode_prompt"]), int(config.seed) + 1)
    with torch_threads() as threads:
        model = _hf_llama(config, device, torch.bfloat16).eval()
        ids = torch.from_numpy(np.asarray(prompt)).long().to(device)
        timing = time_generate(model, ids, size["decode_tokens"], size["decode_repeats"], _sync(device))
    # What one step reads: every param but the input embedding table (one row of it is gathered).
    read = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return dict(timing, impl="torch", batch=1, prompt_length=size["decode_prompt"],
                new_tokens=size["decode_tokens"], repeats=size["decode_repeats"], param_bytes_per_step=read,
                dtype=f"bfloat16 ({device})", name=f"HF LlamaForCausalLM.generate, greedy, use_cache; {_versions()}",
                device=_where(device, threads))
