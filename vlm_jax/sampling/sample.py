"""Sampling text from a trained run: restore its latest checkpoint, stream the generated text.

The functions the `vlm-jax sample` subcommand calls:

    load_for_sampling(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                      step: int | None = None) -> tuple[config, model, params, tokenizer]
    run_sample(workdir: str, prompt: str, *, config: ml_collections.ConfigDict | None = None,
               max_new_tokens: int = 64, method: str = "greedy", temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, beam_size: int = 4, length_penalty: float = 0.6,
               seed: int = 0, step: int | None = None, out: TextIO | None = sys.stdout) -> str

load_for_sampling: the config is `config` if given, else <workdir>/config.json, else the one
stored with the checkpoint; only the params of the checkpoint at `step` (default: the latest) are
read (not the optimiser state), onto the first local device; params a run does not checkpoint
(frozen ones under LoRA) come from config.train.init_from or the seed, as on resume; the
tokenizer is vlm_jax.data.tokenizer.load_or_train(config, workdir).

run_sample: the prompt is encoded as [bos] + pieces (raw text, no template), generation stops at
eos or after max_new_tokens (clamped to what the model's cache can still hold), and the text is
written to `out` as it is generated (the newly completed text after each token, then a newline;
out=None: silent). method: greedy | sample | beam (see vlm_jax.sampling.decode). Returns the
generated text (without the prompt).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import jax
import ml_collections

from vlm_jax.paths import local_dir
from vlm_jax.sampling.decode import decoder_for, stream

CAPTION_TASKS = ("caption", "coca")  # tasks whose models take (images, tokens)


def _saved_config(workdir: str, step: int) -> ml_collections.ConfigDict:
    from vlm_jax import config as config_lib
    from vlm_jax.train.checkpoint import Checkpointer

    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return config_lib.from_json(f.read())
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        return checkpointer.restore_config(step)
    finally:
        checkpointer.close()


def init_inputs(config: ml_collections.ConfigDict) -> tuple:
    """Example inputs for model.init: tokens for a language model, else the task's model inputs of
    a one-image batch (images and tokens for captioners and CLIP, images for a classifier)."""
    import jax.numpy as jnp

    from vlm_jax import tasks

    name = str(config.task.get("name", ""))
    if name == "lm":
        return (jnp.zeros((1, 1), jnp.int32),)
    size = int(config.data.image_size)
    batch = {"image": jnp.zeros((1, size, size, 3), jnp.float32), "tokens": jnp.zeros((1, 2), jnp.int32)}
    return tasks.get(name).model_inputs(batch)


def _load_params(config: ml_collections.ConfigDict, model: Any, workdir: str, step: int) -> Any:
    """The model's full params from the checkpoint at `step`, onto the first local device. Runs with
    frozen params (LoRA, optim.trainable) checkpoint only the trained ones; the others come from
    config.train.init_from, else from the seed's init, as when the trainer resumes. A model with
    state (BatchNorm statistics) gets a variables dict {"params", "batch_stats", ...} instead,
    which the decoders accept too."""
    import flax.linen as nn

    from vlm_jax.layers import lora
    from vlm_jax.train.checkpoint import restore_params
    from vlm_jax.train.optim import trainable_fn
    from vlm_jax.train.trainer import complete_params

    inputs = init_inputs(config)

    def init(rng):
        return nn.meta.unbox(model.init({"params": rng, "dropout": rng}, *inputs, train=False))

    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_vars = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), jax.eval_shape(init, jax.random.PRNGKey(0))
    )
    abstract = abstract_vars["params"]
    state = {k: v for k, v in abstract_vars.items() if k not in ("params", "cache", "intermediates") and v}
    trainable = trainable_fn(config)
    if trainable is None:
        params = restore_params(workdir, abstract, step=step)
    else:
        stored = restore_params(workdir, lora.subset(abstract, trainable(abstract)), step=step)
        init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # the trainer's
        params = complete_params(
            config, abstract, stored, fresh=lambda: jax.jit(lambda r: init(r)["params"], out_shardings=sharding)(init_rng))
    if not state:
        return params
    return {"params": params, **restore_params(workdir, state, step=step, key="model_state")}


def load_for_sampling(
    workdir: str, config: ml_collections.ConfigDict | None = None, *, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Any, Any, Any]:
    """(config, model, params, tokenizer) of the run in workdir at `step` (default: the latest)."""
    from vlm_jax import models
    from vlm_jax.data import tokenizer as tokenizer_lib
    from vlm_jax.train.checkpoint import Checkpointer

    workdir = local_dir(workdir)
    converted = os.path.isdir(os.path.join(workdir, "params")) and not os.path.isdir(os.path.join(workdir, "checkpoints"))
    if converted:  # `vlm-jax convert` output: config.json and the params tree, no steps
        if step is not None:
            raise ValueError(f"{workdir} is a converted model (no training steps): leave out --step")
        config = _saved_config(workdir, 0) if config is None else config
        model = models.build(config)
        return config, model, _load_params(config, model, workdir, None), tokenizer_lib.load_or_train(config, workdir)
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
    finally:
        checkpointer.close()
    if step is None:
        staged = sorted(d for d in (os.listdir(workdir) if os.path.isdir(workdir) else ())
                        if os.path.isdir(os.path.join(workdir, d, "checkpoints")))
        paths = ", ".join(os.path.join(workdir, d) for d in staged)
        hint = f" (a run of stages? pass one of them: {paths})" if staged else ""
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}{hint}")
    if config is None:
        config = _saved_config(workdir, step)
    model = models.build(config)
    params = _load_params(config, model, workdir, step)
    tokenizer = tokenizer_lib.load_or_train(config, workdir)
    return config, model, params, tokenizer


def _emit(out: TextIO | None, shown: str, text: str, final: bool = False) -> str:
    """Writes what `text` adds to the `shown` prefix; holds back a trailing partial character."""
    stable = text if final else text.rstrip("\ufffd")
    if out is not None and stable.startswith(shown) and len(stable) > len(shown):
        out.write(stable[len(shown):])
        out.flush()
        return stable
    return shown


def run_sample(
    workdir: str,
    prompt: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    max_new_tokens: int = 64,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    seed: int = 0,
    step: int | None = None,
    out: TextIO | None = sys.stdout,
) -> str:
    """Continues `prompt` with the run's latest model, streaming the text to `out`; returns it."""
    config, model, params, tokenizer = load_for_sampling(workdir, config, step=step)
    decoder = decoder_for(model)
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("empty prompt and no bos token to start from")
    if decoder.max_len is not None:
        room = decoder.max_len - len(ids) + 1
        if room < 1:
            raise ValueError(f"the prompt's {len(ids)} tokens do not fit the model's {decoder.max_len} positions")
        max_new_tokens = min(max_new_tokens, room)
    stops = (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
    generated: list[int] = []
    shown = ""
    for tok in stream(
        decoder, params, ids, max_new_tokens=max_new_tokens, method=method, temperature=temperature,
        top_k=top_k, top_p=top_p, beam_size=beam_size, length_penalty=length_penalty, stop_tokens=stops,
        rng=seed, pad_id=tokenizer.pad_id,
    ):
        generated.append(tok)
        shown = _emit(out, shown, tokenizer.decode(generated))
    text = tokenizer.decode(generated)
    _emit(out, shown, text, final=True)
    if out is not None:
        out.write("\n")
        out.flush()
    return text
