"""The optimiser from `config.optim`: AdamW with a decay mask, warmup + cosine, clipping.

Parameter groups, each an optimiser of its own (a GAN's two players; a projector at another
learning rate than the model it feeds):

    config.optim.groups = dict(
        discriminator=dict(pattern="^discriminator/", lr=2e-4, b1=0.5),
        generator=dict(pattern="^generator/", lr=2e-4, b1=0.5),
    )

A group's `pattern` is a regex searched in each param path ('generator/deconv_0/kernel'); its
other keys override config.optim's for that group (its schedule, clipping and moments are its
own, and its state sits under its name in the optimiser state). A param goes to the first group
whose pattern it matches; the rest train with config.optim itself (group "train"); frozen params
(trainable_fn) stay frozen whatever group they match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from vlm_jax.layers import lora

# Leaves with these names are weight matrices; everything else (biases, norm scales, the CLIP
# temperature and bias, positional/class embeddings) is not decayed.
DECAYED_NAMES = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """Tree of bools, True where weight decay applies (leaf named kernel or embedding)."""

    def is_decayed(path, _):
        # The last dict key names the leaf; nn.Partitioned boxes add an attribute key after it.
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and str(names[-1]) in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio * lr (or constant)."""
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            cfg.lr, max(total_steps - warmup, 1), alpha=cfg.get("min_lr_ratio", 0.0)
        )
    else:
        raise ValueError(f"unknown lr schedule {cfg.schedule!r}; use cosine or constant")
    if warmup <= 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), decay], boundaries=[warmup]
    )


def trainable_fn(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
    """params -> bool tree of the params that train, or None when all do.

    LoRA (config.model.lora.rank > 0): only the adapters. Else config.optim.trainable, a regex
    searched in each param path ('' = everything).
    """
    model = config.get("model") or {}
    adapters = bool((model.get("lora") or {}).get("rank", 0))
    pattern = str(config.optim.get("trainable", "") or "")
    if not adapters and not pattern:
        return None
    return lambda params: lora.trainable_mask(params, adapters_only=adapters, pattern=pattern)


def _one_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """optax chain: clip by global norm, then the optimiser with the scheduled learning rate."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    elif cfg.name == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.b1),
        )
    else:
        raise ValueError(f"unknown optimiser {cfg.name!r}; use adamw or sgd")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*parts, opt)


def group_configs(cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
    """cfg.groups -> {name: (pattern, that group's optimiser config)}; {} without groups."""
    out = {}
    for name, group in (cfg.get("groups") or {}).items():
        group = dict(group)
        pattern = group.pop("pattern", None)
        if not pattern:
            raise ValueError(f"optim.groups.{name}: give a 'pattern' (a regex over param paths)")
        unknown = sorted(k for k in group if k not in cfg or k == "groups")
        if unknown:
            raise ValueError(f"optim.groups.{name}: unknown optimiser keys {unknown}")
        merged = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "groups"})
        merged.update(group)
        out[str(name)] = (str(pattern), merged)
    if {"train", "frozen"} & set(out):
        raise ValueError("optim.groups: 'train' and 'frozen' are reserved names")
    return out


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, trainable: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
    """The optimiser of config.optim (with its groups, if any).

    trainable (from trainable_fn): the other params are frozen; they keep no optimiser state.
    """
    groups = group_configs(cfg)
    if not groups and trainable is None:
        return _one_optimizer(cfg, total_steps)
    transforms = {"train": _one_optimizer(cfg, total_steps), "frozen": optax.set_to_zero()}
    transforms.update({name: _one_optimizer(c, total_steps) for name, (_, c) in groups.items()})
    patterns = [(name, re.compile(p)) for name, (p, _) in groups.items()]

    def labels(params: Any) -> Any:
        trains = trainable(params) if trainable is not None else jax.tree.map(lambda _: True, params)

        def label(path, _, t):
            if not t:
                return "frozen"
            where = lora.path_string(path)
            return next((name for name, regex in patterns if regex.search(where)), "train")

        return jax.tree_util.tree_map_with_path(label, params, trains)

    return optax.multi_transform(transforms, labels)
