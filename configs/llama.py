"""LLaMA: decoder-only language models (LLaMA 1, 2 and 3).

    vlm-jax train --config configs/llama.py:tiny --workdir runs/llama

Variants: tiny (CPU, minutes, the built-in world's text), llama_7b, llama2_7b, llama2_13b,
llama2_70b, llama3_8b (the published sizes: Touvron et al. 2023a/b, Meta 2024), tinyllama_1b
(TinyLlama 1.1B, Zhang et al. 2024: LLaMA 2's architecture at 22 layers of width 2048).
"""

import ml_collections

from vlm_jax.config_defaults import base_config, default_mesh_and_rules

# name -> (vocab, width, depth, heads, kv heads, mlp dim, norm eps, rope theta, max positions)
_PUBLISHED = {
    "llama_7b": (32000, 4096, 32, 32, 32, 11008, 1e-6, 10000.0, 2048),
    "llama2_7b": (32000, 4096, 32, 32, 32, 11008, 1e-5, 10000.0, 4096),
    "llama2_13b": (32000, 5120, 40, 40, 40, 13824, 1e-5, 10000.0, 4096),
    "llama2_70b": (32000, 8192, 80, 64, 8, 28672, 1e-5, 10000.0, 4096),
    "llama3_8b": (128256, 4096, 32, 32, 8, 14336, 1e-5, 500000.0, 8192),
    "tinyllama_1b": (32000, 2048, 22, 32, 4, 5632, 1e-5, 10000.0, 2048),
}


def _model(
    vocab: int, width: int, depth: int, heads: int, kv_heads: int, mlp_dim: int, eps: float,
    theta: float, max_len: int,
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="llama",
            vocab_size=vocab,
            width=width,
            depth=depth,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=0,  # 0: width // heads
            mlp_dim=mlp_dim,
            norm_eps=eps,
            rope_theta=theta,
            max_len=max_len,  # KV cache length and the longest training sequence
            tie_embeddings=False,
            dtype="float32",  # compute dtype; params stay float32
            scan_layers=False,
            remat="none",  # none | full | dots
            attn_impl="auto",
            # Low-rank adapters (rank 0: none). With rank > 0 only the adapters train, and only
            # they go into the optimiser state and the checkpoints (vlm_jax.layers.lora).
            lora=dict(rank=0, alpha=16.0, targets="query,value"),
        )
    )


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = ml_collections.ConfigDict(dict(name="lm"))
    if arg == "tiny":
        config.model = _model(512, 128, 4, 4, 2, 344, 1e-5, 10000.0, 128)
        config.data.text_length = 128
        config.tokenizer.vocab_size = 512
        config.data.batch_size = 32
        config.optim.lr = 1e-3
        config.optim.warmup_steps = 100
        config.train.steps = 1000
    elif arg in _PUBLISHED:
        config.model = _model(*_PUBLISHED[arg])
        config.model.dtype = "bfloat16"
        config.model.scan_layers = True
        config.model.remat = "dots"
        config.data.source = "jsonl"
        config.data.text_length = config.model.max_len
        config.data.batch_size = 1024  # ~4M tokens per step at 4096
        config.tokenizer.vocab_size = config.model.vocab_size
        config.optim.lr = 3e-4
        config.optim.b2 = 0.95
        config.optim.eps = 1e-5
        config.optim.weight_decay = 0.1
        config.optim.warmup_steps = 2000
        config.optim.min_lr_ratio = 0.1
        config.train.steps = 500_000
    else:
        raise ValueError(
            f"unknown llama variant {arg!r}; choose tiny, {', '.join(_PUBLISHED)}"
        )
    config.mesh, config.sharding_rules = default_mesh_and_rules()
    # Grouped KV heads split over `tensor` like the query heads (rules.py drops a split that does
    # not divide, e.g. 8 kv heads on a 16-way tensor axis).
    config.sharding_rules.append(["kv_heads", "tensor"])
    return config


def get_sweep(arg: str | None = "tiny") -> list[dict]:
    """Override dicts for `launch/sweep.py --config configs/llama.py:<arg>`, one run each.

    tiny: learning rate x depth; published sizes: the learning rate around 3e-4.
    """
    arg = arg or "tiny"
    if arg == "tiny":
        return [{"optim.lr": lr, "model.depth": depth} for lr in (5e-4, 1e-3, 2e-3) for depth in (2, 4)]
    if arg in _PUBLISHED:
        return [{"optim.lr": lr} for lr in (1.5e-4, 3e-4, 6e-4)]
    raise ValueError(f"unknown llama variant {arg!r}; choose tiny, {', '.join(_PUBLISHED)}")
