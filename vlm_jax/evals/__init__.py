"""Evaluators named in `config.evals`: each runs some metric kinds on one split.

    config.evals.val = dict(kinds=("zero_shot", "retrieval"), split="validation", num_examples=1024)

reports `val/zero_shot_top1`, `val/i2t_r1`, ... Kinds: zero_shot, retrieval (image-text models with
encode_image/encode_text), accuracy (classifiers), exact_match (instruction following, on its
own: evals.instruct), generation (text-to-image, on its own: evals.generation) and prior (a diffusion
prior's sampled CLIP embeddings, on its own: evals.prior).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlm_jax.evals.features import BatchedApply
from vlm_jax.evals.retrieval import retrieval_metrics
from vlm_jax.evals.zero_shot import class_embeddings, zero_shot_metrics

KINDS = ("zero_shot", "retrieval", "accuracy")


class Evaluator:
    """One entry of config.evals: loads its split once, then scores params on demand."""

    def __init__(
        self,
        name: str,
        eval_cfg: ml_collections.ConfigDict,
        config: ml_collections.ConfigDict,
        model: nn.Module,
        tokenizer: Any,
        mesh: Mesh,
    ):
        from vlm_jax.data import pipeline  # Data code is only needed once evaluators are built.

        unknown = set(eval_cfg.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"evaluator {name!r}: unknown kinds {sorted(unknown)}; known: {KINDS}")
        self.name, self.kinds = name, tuple(eval_cfg.kinds)
        self.text_length = config.data.text_length
        self.data = pipeline.eval_data(config, eval_cfg.split, eval_cfg.num_examples, tokenizer)
        batch = eval_cfg.get("batch_size", 256)
        rules = config.sharding_rules
        if {"zero_shot", "retrieval"} & set(self.kinds):
            self._images = BatchedApply(model, "encode_image", mesh, rules, batch)
            self._texts = BatchedApply(model, "encode_text", mesh, rules, batch)
        if "accuracy" in self.kinds:
            self._logits = BatchedApply(model, None, mesh, rules, batch)
        self.class_names = tuple(eval_cfg.get("class_names", ()))
        self.templates = tuple(eval_cfg.get("templates", ()))
        if "zero_shot" in self.kinds and not self.class_names:
            if config.data.source != "world":
                raise ValueError(
                    f"evaluator {name!r}: zero_shot on {config.data.source!r} data needs "
                    "class_names and templates in its config"
                )
            from vlm_jax.data import world

            self.class_names, self.templates = tuple(world.CLASS_NAMES), tuple(world.PROMPT_TEMPLATES)
        # Prompts are tokenised once; each evaluation only re-embeds them.
        self._prompt_tokens = {}
        if "zero_shot" in self.kinds:
            prompts = [t.format(c) for c in self.class_names for t in self.templates]
            self._prompt_tokens = dict(zip(prompts, tokenizer.tokenize(prompts, self.text_length)))


    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/<metric>'."""
        model_state = model_state or {}
        data, out = self.data, {}
        labels = data.get("label")
        held_out = data.get("held_out")
        if {"zero_shot", "retrieval"} & set(self.kinds):
            image_embeds = self._images(params, model_state, data["image"])
        if "zero_shot" in self.kinds:
            if labels is None:
                raise ValueError(f"evaluator {self.name!r}: zero_shot needs labelled data")
            classes = class_embeddings(
                lambda texts: self._texts(
                    params, model_state, np.stack([self._prompt_tokens[t] for t in texts])
                ),
                self.class_names,
                self.templates,
            )
            out.update(
                zero_shot_metrics(image_embeds, classes, labels, held_out, data.get("num_objects"))
            )
        if "retrieval" in self.kinds:
            # Every caption of every image, flattened; caption_owner maps each back to its image.
            text_embeds = self._texts(params, model_state, data["tokens"])
            out.update(retrieval_metrics(image_embeds, text_embeds, data["caption_owner"]))
        if "accuracy" in self.kinds:
            logits = self._logits(params, model_state, data["image"])
            hit = np.argmax(logits, axis=-1) == labels
            out["accuracy"] = float(hit.mean())
            if held_out is not None and held_out.any():
                out["accuracy_heldout"] = float(hit[held_out].mean())
        return {f"{self.name}/{k}": v for k, v in out.items()}


def build(
    config: ml_collections.ConfigDict, model: nn.Module, tokenizer: Any, mesh: Mesh, workdir: str | None = None
) -> list[Any]:
    """The evaluators of config.evals, in order (exact_match: evals.instruct.InstructEvaluator;
    caption: evals.captioning.CaptionEvaluator; generation: evals.generation.GenerationEvaluator,
    which resolves a clip_workdir of "stage:<name>" beside `workdir`, the run's own folder)."""
    from vlm_jax.evals.captioning import CaptionEvaluator
    from vlm_jax.evals.instruct import InstructEvaluator

    out = []
    for name, cfg in (config.get("evals") or {}).items():
        if "exact_match" in cfg.kinds:
            if set(cfg.kinds) != {"exact_match"}:
                raise ValueError(f"evaluator {name!r}: exact_match cannot be combined with {list(cfg.kinds)}")
            out.append(InstructEvaluator(name, cfg, config, model, tokenizer))
        elif "caption" in cfg.kinds:
            if set(cfg.kinds) != {"caption"}:
                raise ValueError(f"evaluator {name!r}: caption cannot be combined with {list(cfg.kinds)}")
            out.append(CaptionEvaluator(name, cfg, config, model, tokenizer))
        elif "generation" in cfg.kinds:
            from vlm_jax.evals.generation import GenerationEvaluator

            if set(cfg.kinds) != {"generation"}:
                raise ValueError(f"evaluator {name!r}: generation cannot be combined with {list(cfg.kinds)}")
            out.append(GenerationEvaluator(name, cfg, config, model, tokenizer, mesh, workdir))
        elif "prior" in cfg.kinds:  # a diffusion prior's sampled CLIP embeddings: evals.prior
            from vlm_jax.evals.prior import PriorEvaluator

            if set(cfg.kinds) != {"prior"}:
                raise ValueError(f"evaluator {name!r}: prior cannot be combined with {list(cfg.kinds)}")
            out.append(PriorEvaluator(name, cfg, config, model, tokenizer, mesh))
        elif "reconstruction" in cfg.kinds:  # image tokenizers and autoencoders: evals.reconstruction
            from vlm_jax.evals.reconstruction import ReconstructionEvaluator

            if set(cfg.kinds) != {"reconstruction"}:
                raise ValueError(f"evaluator {name!r}: reconstruction cannot be combined with {list(cfg.kinds)}")
            out.append(ReconstructionEvaluator(name, cfg, config, model, tokenizer, mesh))
        else:
            out.append(Evaluator(name, cfg, config, model, tokenizer, mesh))
    return out
