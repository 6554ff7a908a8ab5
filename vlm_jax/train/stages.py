"""Runs made of stages (pretrain, then instruction-tune; LLaVA's two stages): each stage is a run
of its own in <workdir>/<stage>, starting from the previous stage's params and tokenizer.

    config.stages = dict(
        order=("pretrain", "instruct"),
        pretrain=dict(data=dict(source="world_text"), train=dict(steps=1500)),
        instruct=dict(data=dict(source="world_instruct"), optim=dict(lr=3e-4)),
    )

A stage's entries override the config's keys (an unknown key is an error, as on the command line).
A stage with `config="configs/clip.py:tiny"` starts from that config instead (a stage of another
family, e.g. a captioner's encoder pretrained contrastively; the next stage then picks the params
it wants with train.init_from_map); it still takes the base config's data, tokenizer, mesh and
seed (SHARED_KEYS), so command-line overrides of those reach every stage.
Re-running the command resumes: finished stages are not trained again. The run's folder holds
stages.json (the order), so `vlm-jax eval|sample --workdir <run>` find its last stage.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections

from vlm_jax import config as config_lib
from vlm_jax.paths import local_dir


# What a stage with its own config (`config=...`) still takes from the base config.
SHARED_KEYS = (
    "seed", "data.source", "data.path", "data.image_root", "data.tfds_data_dir", "data.world_seed",
    "data.world_num_examples", "data.image_size", "tokenizer.path", "tokenizer.vocab_size", "mesh",
    "sharding_rules",
)


def _flatten(node: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stages in order; [] for a single-stage config."""
    stages = config.get("stages")
    if not stages:
        return []
    order = stages.get("order") or ()
    order = [s.strip() for s in order.split(",")] if isinstance(order, str) else list(order)
    missing = [s for s in order if s not in stages]
    if not order or missing:
        raise config_lib.ConfigError(f"config.stages.order {order} names stages without a section: {missing}")
    return order


def stage_config(
    config: ml_collections.ConfigDict, name: str, previous: str | None, text_tokenizer_from: str | None = None
) -> ml_collections.ConfigDict:
    """The config of one stage: the base config with the stage's overrides, and, after the first
    stage, init_from and the tokenizer of the previous stage (unless the stage sets them).
    text_tokenizer_from: the stage folder whose tokenizer.model to take instead of the previous
    one's (the last stage that has one: a stage that reads no text, e.g. an image tokenizer,
    writes none)."""
    overrides = _flatten(config.stages[name])
    spec = overrides.pop("config", None)
    if spec:  # a stage of another family (e.g. a CLIP encoder for a captioner): its own config
        stage = config_lib.load(str(spec))
        # Stages share the data, the tokenizer, the mesh and the seed: those come from the base config.
        for key in SHARED_KEYS:
            section, _, leaf = key.rpartition(".")
            base = config.get(section) if section else config
            if base is not None and leaf in base:
                config_lib.apply_overrides(stage, {key: copy.deepcopy(base[leaf])})
    else:
        stage = copy.deepcopy(config)
        with stage.unlocked():
            del stage["stages"]
    config_lib.apply_overrides(stage, overrides)
    if previous is not None:
        if "train.init_from" not in overrides:
            stage.train.init_from = previous
        if "tokenizer.path" not in overrides and not stage.tokenizer.get("path"):
            stage.tokenizer.path = os.path.join(text_tokenizer_from or previous, "tokenizer.model")
    return stage


STAGES_FILE = "stages.json"
STAGE_REF = "stage:"  # train.init_also's name for another stage of the same run


def last_stage_dir(workdir: str, config: ml_collections.ConfigDict | None = None) -> str | None:
    """The folder of the last stage that has started (holds its config.json) in a run of stages:
    the order from `config` when it has stages, else from the run's stages.json; None when
    workdir is not a run of stages."""
    order = stage_names(config) if config is not None else []
    path = os.path.join(workdir, STAGES_FILE)
    if not order and os.path.exists(path):
        with open(path) as f:
            order = list(json.load(f)["order"])
    started = [name for name in order if os.path.exists(os.path.join(workdir, name, "config.json"))]
    return os.path.join(workdir, started[-1]) if started else None


def _resolve_stage_refs(entries: Any, workdir: str, done: list[str]) -> tuple[str, ...]:
    """train.init_also entries 'stage:<name>=...' -> '<workdir>/<name>=...' (a stage of this run that
    has already trained; anything else is an error)."""
    out = []
    for entry in entries:
        entry = str(entry)
        if entry.startswith(STAGE_REF):
            name = entry[len(STAGE_REF):].partition("=")[0].strip()
            if name not in done:
                raise config_lib.ConfigError(
                    f"train.init_also {entry!r}: stage {name!r} is not an earlier stage of this run {done}")
            entry = os.path.join(workdir, entry[len(STAGE_REF):])
        out.append(entry)
    return tuple(out)


def train_stages(config: ml_collections.ConfigDict, workdir: str, **train_kwargs: Any) -> list[tuple[str, dict]]:
    """Trains every stage in order; returns [(stage name, trainer summary)]."""
    from vlm_jax.train.trainer import train

    from vlm_jax.parallel import hosts

    workdir = local_dir(workdir)
    if hosts.is_main_process():  # one writer on a shared filesystem
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, STAGES_FILE), "w") as f:
            json.dump({"order": stage_names(config)}, f)
    summaries, previous, text_tokenizer = [], None, None
    for name in stage_names(config):
        stage_dir = os.path.join(workdir, name)
        stage = stage_config(config, name, previous, text_tokenizer)
        if stage.train.get("init_also"):
            earlier = stage_names(config)[: len(summaries)]
            stage.train.init_also = _resolve_stage_refs(stage.train.init_also, workdir, earlier)
        summary = train(stage, stage_dir, **train_kwargs)
        summaries.append((name, summary))
        if not summary.get("finished"):
            break  # preempted: the next run resumes this stage
        previous = stage_dir
        if os.path.exists(os.path.join(stage_dir, "tokenizer.model")):
            text_tokenizer = stage_dir
    return summaries
