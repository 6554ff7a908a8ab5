"""Alpaca: instruction tuning of a LLaMA (Taori et al. 2023).

    vlm-jax train --config configs/alpaca.py:tiny --workdir runs/alpaca

tiny: two stages on the CPU. `pretrain` trains a tiny LLaMA on plain text about the built-in
world (runs/alpaca/pretrain), `instruct` tunes it on the world's instruction set in the Alpaca
prompt format, the loss on the responses only (runs/alpaca/instruct). Both end by answering the
held-out validation instructions greedily: the pretrain stage's exact match is the no-tuning
baseline, the instruct stage's the tuned model's.

llama_7b / llama2_7b: the Stanford Alpaca recipe (lr 2e-5, 3 epochs of the 52K items, length
512, batch 128, cosine with 3% warmup, no weight decay) on an imported LLaMA:

    vlm-jax convert --from-hf path/to/Llama-2-7b-hf --out llama2_7b
    vlm-jax train --config configs/alpaca.py:llama2_7b --workdir runs/alpaca7b \\
        --config.data.path alpaca_data.json --config.tokenizer.path path/to/tokenizer.model \\
        --config.train.init_from llama2_7b

with `--config.model.lora.rank 8` (and a larger lr, e.g. 3e-4) for LoRA instead of full tuning.
"""

import importlib.util
import os

import ml_collections


def _llama_config(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama.py")
    spec = importlib.util.spec_from_file_location("vlm_jax_configs_llama", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg == "tiny":
        config = _llama_config("tiny")
        config.task.name = "lm"
        config.data.source = "world_instruct"
        config.data.text_length = 128
        config.data.batch_size = 32
        config.data.packing = True
        config.optim.warmup_steps = 50
        config.train.log_every = 50
        config.train.eval_every = 0
        config.evals = ml_collections.ConfigDict(
            dict(
                val=dict(
                    kinds=("exact_match",), split="validation", num_examples=256, max_new_tokens=12,
                    batch_size=128, source="world_instruct",
                )
            )
        )
        config.stages = ml_collections.ConfigDict(
            dict(
                order=("pretrain", "instruct"),
                pretrain=dict(data=dict(source="world_text"), optim=dict(lr=2e-3), train=dict(steps=1200)),
                instruct=dict(optim=dict(lr=1e-3), train=dict(steps=800)),
            )
        )
        return config
    if arg in ("llama_7b", "llama2_7b"):
        config = _llama_config(arg)
        config.task.name = "lm"
        config.data.source = "alpaca"
        config.data.text_length = 512
        config.data.batch_size = 128
        config.data.packing = False
        config.optim.lr = 2e-5
        config.optim.weight_decay = 0.0
        config.optim.b2 = 0.999
        config.optim.min_lr_ratio = 0.0
        steps_per_epoch = 52002 // 128
        config.train.steps = 3 * steps_per_epoch
        config.optim.warmup_steps = int(0.03 * config.train.steps)
        config.train.eval_every = 0
        config.evals = ml_collections.ConfigDict()
        return config
    raise ValueError(f"unknown alpaca variant {arg!r}; choose tiny, llama_7b or llama2_7b")


def get_sweep(arg: str | None = "tiny") -> list[dict]:
    """Override dicts for `launch/sweep.py --config configs/alpaca.py:<arg>`, one run each.

    tiny: the instruct stage's learning rate x the loss on the prompt too (the pretrain stage is
    the same in every run). llama_7b / llama2_7b: full tuning at the Stanford recipe's 2e-5
    against LoRA of rank 8, 16 and 64 at 3e-4 (pass --config.train.init_from and the data paths to
    the sweep as to `vlm-jax train`).
    """
    arg = arg or "tiny"
    if arg == "tiny":
        return [
            {"stages.instruct.optim.lr": lr, "data.train_on_prompt": on_prompt}
            for lr in (3e-4, 1e-3, 3e-3)
            for on_prompt in (False, True)
        ]
    if arg in ("llama_7b", "llama2_7b"):
        return [{"model.lora.rank": 0, "optim.lr": 2e-5}] + [
            {"model.lora.rank": rank, "optim.lr": 3e-4} for rank in (8, 16, 64)
        ]
    raise ValueError(f"unknown alpaca variant {arg!r}; choose tiny, llama_7b or llama2_7b")
