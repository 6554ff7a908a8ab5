"""Judging a diffusion prior's sampled CLIP image embeddings (evaluator kind `prior`).

    config.evals.val = dict(kinds=("prior",), split="validation", num_examples=256, batch_size=256, seed=0)

On the first num_examples pairs of the split: one caption per image (its phrasing i mod the number
of captions, as evals.generation picks prompts), one embedding sampled per caption by the run's
prior (tasks.diffusion_prior.sample_embeddings with config.task: its sampler, guidance and best
of n; rng PRNGKey(seed) folded with the batch number, the same at every evaluation), beside the
frozen CLIP's embeddings of the true image and of the caption. Reported under '<eval>/':

    prior/cos_image            cosine of the sampled embedding with the true image's
    prior/cos_text             cosine of the sampled embedding with the caption's text embedding
    prior/real/cos_text        cosine of the true image's embedding with its caption's (the ceiling
                               of cos_text: what a prior that draws the true image would score)
    prior/shuffled/cos_image   cosine of the embedding sampled for the next caption (i + 1 mod P)
                               with image i (the floor of cos_image)
    prior/retrieval_top1       the true image is the nearest (cosine) of the P evaluated images to
                               its caption's sampled embedding
    prior/text/retrieval_top1  the same with the caption's CLIP text embedding as the query (what
                               the prior's sample should beat: CLIP's own text-to-image retrieval)
    ..._heldout, ..._seen      each over the examples whose main colour-shape pair is held out from
                               training / is not (where the split marks them, as evals.generation)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax.evals.features import l2_normalize
from vlm_jax.evals.generation import pick_prompt
from vlm_jax.tasks import diffusion_prior


def _split_means(name: str, values: np.ndarray, held_out: np.ndarray) -> dict[str, float]:
    """values [P] -> {name: mean, name_heldout: mean over held_out, name_seen: over the rest}
    (a split without examples left out)."""
    out = {}
    for suffix, rows in (("", np.ones_like(held_out)), ("_heldout", held_out), ("_seen", ~held_out)):
        if rows.any():
            out[name + suffix] = float(np.mean(values[rows]))
    return out


def prior_metrics(sampled: np.ndarray, image_embeds: np.ndarray, text_embeds: np.ndarray,
                  held_out: np.ndarray | None = None) -> dict[str, float]:
    """sampled, image_embeds, text_embeds [P, E] (row i: caption i's sample, its true image, its
    text; any scale), held_out bool [P] -> the module docstring's metrics, named 'prior/...'."""
    s, im, tx = (l2_normalize(np.asarray(x, np.float64)) for x in (sampled, image_embeds, text_embeds))
    p = len(s)
    if p < 2 or im.shape != s.shape or tx.shape != s.shape:
        raise ValueError(f"prior metrics need P >= 2 rows of equal shapes, got {s.shape}, {im.shape}, {tx.shape}")
    held_out = np.zeros(p, bool) if held_out is None else np.asarray(held_out, bool)
    rows = np.arange(p)
    per_example = {
        "prior/cos_image": np.sum(s * im, -1),
        "prior/cos_text": np.sum(s * tx, -1),
        "prior/real/cos_text": np.sum(im * tx, -1),
        "prior/shuffled/cos_image": np.sum(np.roll(s, -1, axis=0) * im, -1),
        "prior/retrieval_top1": (np.argmax(s @ im.T, axis=1) == rows).astype(np.float64),
        "prior/text/retrieval_top1": (np.argmax(tx @ im.T, axis=1) == rows).astype(np.float64),
    }
    out = {}
    for name, values in per_example.items():
        out.update(_split_means(name, values, held_out))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _embeds(model: nn.Module, variables: dict, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (model.apply(variables, images, method=model.embed_image),
            model.apply(variables, tokens, method=model.embed_text))


def _batched(fn: Callable[..., Any], arrays: tuple[np.ndarray, ...], batch_size: int) -> list[np.ndarray]:
    """fn(batch_index, *batches) over [N, ...] arrays in fixed-size batches (the last padded with
    copies of its last row, so one shape compiles) -> its outputs, each [N, ...] numpy."""
    n = len(arrays[0])
    outs: list[list[np.ndarray]] = []
    for i, start in enumerate(range(0, n, batch_size)):
        chunk = [a[start:start + batch_size] for a in arrays]
        rows = len(chunk[0])
        if rows < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - rows, axis=0)]) for c in chunk]
        result = fn(i, *chunk)
        result = result if isinstance(result, tuple) else (result,)
        outs.append([np.asarray(r, np.float32)[:rows] for r in result])
    return [np.concatenate(parts) for parts in zip(*outs)]


class PriorEvaluator:
    """One config.evals entry of kind prior: captions and images loaded once, then each call samples
    an embedding per caption and scores it (see the module docstring)."""

    kinds = ("prior",)

    def __init__(self, name: str, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 model: nn.Module, tokenizer: Any, mesh: jax.sharding.Mesh | None = None):
        from vlm_jax.data import pipeline  # data code only once evaluators are built

        del mesh  # sampling runs on the default device layout, as evals.generation's does
        self.name, self.config, self.model = name, config, model
        self.batch_size = int(eval_cfg.get("batch_size", 256))
        self.seed = int(eval_cfg.get("seed", 0))
        if self.batch_size < 1:
            raise ValueError(f"evaluator {name!r}: batch_size must be >= 1, got {self.batch_size}")
        diffusion_prior.sampling_settings(config.task)  # bad sampler settings fail here, not at the first eval
        data = pipeline.eval_data(config, eval_cfg.split, eval_cfg.get("num_examples"), tokenizer)
        self.images = np.asarray(data["image"], np.float32)
        if len(self.images) < 2:
            raise ValueError(f"evaluator {name!r}: the shuffled-caption floor needs at least 2 examples")
        owner = np.asarray(data["caption_owner"])
        first = np.searchsorted(owner, np.arange(len(self.images)))  # each image's first caption row
        counts = np.bincount(owner, minlength=len(self.images))
        picked = [pick_prompt(list(range(f, f + c)), i) for i, (f, c) in enumerate(zip(first, counts))]
        self.tokens = np.asarray(data["tokens"], np.int32)[picked]
        held = data.get("held_out")
        self.held_out = np.asarray(held, bool) if held is not None else np.zeros(len(self.images), bool)
        self.batch_size = min(self.batch_size, len(self.images))

    def embed(self, variables: dict) -> tuple[np.ndarray, np.ndarray]:
        """(the true images' scaled CLIP embeddings [P, E], the captions' [P, E])."""
        image_embeds, text_embeds = _batched(lambda _, im, tok: _embeds(self.model, variables, im, tok),
                                             (self.images, self.tokens), self.batch_size)
        return image_embeds, text_embeds

    def sample(self, variables: dict) -> np.ndarray:
        """One sampled embedding per caption [P, E] (batch i drawn with fold_in(PRNGKey(seed), i))."""
        key = jax.random.PRNGKey(self.seed)
        (out,) = _batched(lambda i, tok: diffusion_prior.sample_embeddings(
            self.model, variables, tok, jax.random.fold_in(key, i), self.config.task), (self.tokens,), self.batch_size)
        return out

    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/prior/...' (see the module docstring)."""
        variables = {"params": params, **(model_state or {})}
        image_embeds, text_embeds = self.embed(variables)
        out = prior_metrics(self.sample(variables), image_embeds, text_embeds, self.held_out)
        return {f"{self.name}/{k}": v for k, v in out.items()}
