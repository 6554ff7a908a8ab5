"""Judging generated images (evaluator kind `generation`): draw from held-out prompts, read back.

    config.evals.gen = dict(kinds=("generation",), split="validation", num_examples=64,
                            samples_per_prompt=8, clip_workdir="stage:clip", batch_size=64,
                            grid_prompts=8, seed=0)

Prompts: one per evaluated example of the built-in world, its caption number (i mod 6) so that the
six phrasings take turns, read back into the objects it names by data.prompts.parse_prompt; the
example's `held_out` flag (its main colour-shape pair never appears in training) splits every
figure. The run's task draws `samples_per_prompt` images per prompt (sampling.draw: the task
module's generate, rng PRNGKey(seed) folded with the batch number, the same at every evaluation),
and data.scorer reads each image back into objects, matched to the prompt's objects. Reported
under '<eval>/':

    gen/main_acc       the main (first) object's colour and shape right
    gen/all_acc        every object the prompt names with every attribute it names, and the number
                       of objects right (at least as many when the prompt names only the main
                       object: "the large shape is a red circle.")
    gen/<a>_acc        a in color, shape, size, position: the share of the objects naming a that got
                       it right, averaged over the prompts that name a at all
    ..._heldout, ..._seen   each of these over the prompts with a held-out / a training main pair

for the first sample of each prompt, and the same under gen/real/ for the real images of the
prompts (the ceiling: what the scorer reads from the truth, at the size the task draws:
sampling.draw.output_size) and gen/shuffled/ for the first sample
of the next prompt (prompt i judged on the image drawn for prompt i + 1 mod P: the floor, about
chance). With a CLIP (`clip_workdir`: a run's folder, or "stage:<name>" for a stage of the current
run of stages; evals.clip_judge): gen/clip_score (100 * max(cos, 0) between the CLIP embeddings of
each image and its prompt, the w = 100 convention of the text-to-image literature, averaged over
every sample), gen/real/clip_score (the same for the real images), gen/fd_clip (evals.frechet's
Fréchet distance between the unit CLIP image embeddings of all generated samples and of the real
images; it depends on the numbers of images, so compare it at one num_examples and
samples_per_prompt), gen/real/fd_clip (the floor: the same distance between the real images'
two halves, even and odd prompts, with 4 prompts or more; a generator as good as the data would
score about this, a little less for having twice the images per side), and, with
samples_per_prompt > 1, gen/rerank/... (the best of N by CLIP score, the first sample being the
one-sample figure). Without a CLIP those are not reported, and a
warning says so when the evaluator is built.

Each evaluation's first `grid_prompts` prompts with all their samples go to a PNG grid (a row per
prompt, the prompt under it): the trainer calls write_grid(<workdir>/samples, step), giving
<workdir>/samples/<eval>_step<step>.png; samples() gives per-prompt verdicts for the JSON lines
beside it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax.data import prompts as prompts_lib
from vlm_jax.data import scorer
from vlm_jax.data.normalise import denormalise
from vlm_jax.evals import clip_judge
from vlm_jax.evals.frechet import frechet_distance  # noqa: F401  (part of this module's interface)
from vlm_jax.sampling import draw

log = logging.getLogger(__name__)

JUDGED = ("color", "shape", "size", "position")
MAIN = ("color", "shape")  # what the main object must get right for main_acc
METRICS = ("main_acc", "all_acc") + tuple(f"{a}_acc" for a in JUDGED)


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images [N, S, S, 3] at side `size` (box filter; unchanged when S is already size): the
    real images at the resolution the task draws, for a like-for-like ceiling and Fréchet distance."""
    if images.shape[1] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in images])


def pick_prompt(captions: list[str], index: int) -> str:
    """The caption that stands for example `index`: phrasing index mod len(captions)."""
    if not captions:
        raise ValueError(f"example {index} has no caption to draw from")
    return captions[index % len(captions)]


def judge(image: np.ndarray, prompt: prompts_lib.Prompt) -> dict[str, float]:
    """How well a uint8 [S, S, 3] image shows a parsed prompt -> main_acc and all_acc (0 or 1) and,
    for each attribute the prompt names, <attribute>_acc (the share of the naming objects right)."""
    found = scorer.read_objects(image)
    expected = prompt.objects
    chosen = scorer.match(expected, found)
    out: dict[str, float] = {}
    for attribute in JUDGED:
        right = [got is not None and got[attribute] == want[attribute]
                 for want, got in zip(expected, chosen) if attribute in want]
        if right:
            out[f"{attribute}_acc"] = float(np.mean(right))
    main_want, main_got = expected[0], chosen[0]
    out["main_acc"] = float(main_got is not None and all(main_got[a] == main_want[a] for a in MAIN if a in main_want))
    count_right = len(found) == len(expected) if prompt.exact_count else len(found) >= len(expected)
    every = all(out[f"{a}_acc"] == 1.0 for a in JUDGED if f"{a}_acc" in out)
    out["all_acc"] = float(count_right and every and all(got is not None for got in chosen))
    return out


def summarise(verdicts: list[dict[str, float]], held_out: np.ndarray) -> dict[str, float]:
    """Per-prompt verdicts (judge's) and held_out bool [P] -> each metric averaged over the prompts
    that have it, and over the held-out / seen ones as <metric>_heldout / <metric>_seen."""
    held_out = np.asarray(held_out, bool)
    out = {}
    for metric in METRICS:
        values = np.asarray([v.get(metric, np.nan) for v in verdicts], np.float64)
        for suffix, rows in (("", np.ones_like(held_out)), ("_heldout", held_out), ("_seen", ~held_out)):
            chosen = values[rows & ~np.isnan(values)]
            if chosen.size:
                out[metric + suffix] = float(chosen.mean())
    return out


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {prefix + k: v for k, v in metrics.items()}


class GenerationEvaluator:
    """One config.evals entry of kind generation: prompts and real images loaded once, then each
    call draws with the task's generate and judges what it drew (see the module docstring)."""

    kinds = ("generation",)

    def __init__(
        self, name: str, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        model: nn.Module, tokenizer: Any, mesh: jax.sharding.Mesh | None = None, workdir: str | None = None,
        clip: Any = None,
    ):
        """clip: an object with embed_images / embed_texts (clip_judge.ClipJudge's) to use instead of
        the one eval_cfg.clip_workdir names (None: that one, or none when it is empty)."""
        from vlm_jax.data import pipeline

        self.name, self.config, self.model = name, config, model
        self.task = draw.text_to_image_task(config)
        self.samples_per_prompt = int(eval_cfg.get("samples_per_prompt", 1))
        self.batch_size = int(eval_cfg.get("batch_size", 64))
        self.grid_prompts = int(eval_cfg.get("grid_prompts", 8))
        self.seed = int(eval_cfg.get("seed", 0))
        if self.samples_per_prompt < 1 or self.batch_size < 1 or self.grid_prompts < 0:
            raise ValueError(f"evaluator {name!r}: samples_per_prompt and batch_size must be >= 1, grid_prompts >= 0")
        self.data = pipeline.eval_data(config, eval_cfg.split, eval_cfg.get("num_examples"), tokenizer)
        self.prompts = [pick_prompt(caps, i) for i, caps in enumerate(self.data["captions"])]
        if len(self.prompts) < 2:
            raise ValueError(f"evaluator {name!r}: the prompt-shuffled control needs at least 2 prompts")
        try:
            self.parsed = [prompts_lib.parse_prompt(p) for p in self.prompts]
        except ValueError as e:
            raise ValueError(f"evaluator {name!r} judges prompts in the built-in world's words "
                             f"(data.source 'world', not {config.data.source!r}): {e}") from e
        held = self.data.get("held_out")
        self.held_out = np.asarray(held, bool) if held is not None else np.zeros(len(self.prompts), bool)
        self.tokens = draw.prompt_tokens(tokenizer, self.prompts, int(config.data.text_length))
        real = resized(denormalise(self.data["image"], config), draw.output_size(self.task, config))
        self.real = _prefixed("gen/real/", summarise([judge(im, p) for im, p in zip(real, self.parsed)], self.held_out))
        self.clip = clip if clip is not None else clip_judge.judge_from_config(eval_cfg, workdir, mesh)
        if self.clip is None:
            log.warning("evaluator %r: no clip_workdir, so no gen/clip_score, gen/fd_clip or gen/rerank", name)
        else:
            self.text_embeds = self.clip.embed_texts(self.prompts)
            self.real_embeds = self.clip.embed_images(real)
            self.real["gen/real/clip_score"] = float(clip_judge.clip_score(self.real_embeds, self.text_embeds).mean())
            if len(self.real_embeds) >= 4:  # two images a side at least
                self.real["gen/real/fd_clip"] = frechet_distance(self.real_embeds[0::2], self.real_embeds[1::2])
            if self.samples_per_prompt == 1:
                log.warning("evaluator %r: samples_per_prompt 1, so no gen/rerank", name)
        self.last_images: np.ndarray | None = None
        self.last_verdicts: list[dict[str, float]] = []
        self.last_scores: np.ndarray | None = None
        self.last_choice: np.ndarray | None = None

    def generate(self, params: Any, model_state: dict | None = None) -> np.ndarray:
        """Every prompt's samples: uint8 [P, N, S, S, 3] (N = samples_per_prompt)."""
        variables = {"params": params, **(model_state or {})}
        n = self.samples_per_prompt
        images = draw.generate_images(
            self.task, self.model, variables, np.repeat(self.tokens, n, axis=0), jax.random.PRNGKey(self.seed),
            self.config, self.batch_size,
        )
        return images.reshape(len(self.prompts), n, *images.shape[1:])

    def __call__(self, params: Any, model_state: dict | None = None) -> dict[str, float]:
        """Metrics named '<evaluator>/gen/...' (see the module docstring)."""
        images = self.generate(params, model_state)
        first = images[:, 0]
        verdicts = [judge(image, p) for image, p in zip(first, self.parsed)]
        shuffled = [judge(first[(i + 1) % len(first)], p) for i, p in enumerate(self.parsed)]
        out = {**_prefixed("gen/", summarise(verdicts, self.held_out)),
               **_prefixed("gen/shuffled/", summarise(shuffled, self.held_out)), **self.real}
        self.last_images, self.last_verdicts, self.last_scores, self.last_choice = images, verdicts, None, None
        if self.clip is not None:
            p, n = images.shape[:2]
            embeds = self.clip.embed_images(images.reshape(p * n, *images.shape[2:]))
            scores = clip_judge.clip_score(embeds.reshape(p, n, -1), self.text_embeds[:, None, :])
            out["gen/clip_score"] = float(scores.mean())
            out["gen/fd_clip"] = frechet_distance(embeds, self.real_embeds)
            self.last_scores = scores
            if n > 1:
                choice = np.argmax(scores, axis=1)  # ties: the earliest sample
                reranked = [verdicts[i] if c == 0 else judge(images[i, c], self.parsed[i])
                            for i, c in enumerate(choice)]
                out.update(_prefixed("gen/rerank/", summarise(reranked, self.held_out)))
                self.last_choice = choice
        return {f"{self.name}/{k}": v for k, v in out.items()}

    def samples(self) -> list[dict[str, Any]]:
        """The last call's prompts: text, held_out, the objects asked for, the first sample's verdict
        and the objects read from it, and with a CLIP each sample's CLIP score (and the reranked pick)."""
        if self.last_images is None:
            return []
        out = []
        for i, (prompt, verdict) in enumerate(zip(self.prompts, self.last_verdicts)):
            found = scorer.read_objects(self.last_images[i, 0])
            item = dict(prompt=prompt, held_out=bool(self.held_out[i]), expected=self.parsed[i].objects,
                        verdict=verdict, found=[{a: o[a] for a in JUDGED} for o in found])
            if self.last_scores is not None:
                item["clip_scores"] = [round(float(s), 4) for s in self.last_scores[i]]
            if self.last_choice is not None:
                item["rerank_choice"] = int(self.last_choice[i])
            out.append(item)
        return out

    def write_grid(self, directory: str, step: int) -> str | None:
        """The last call's first grid_prompts prompts, all their samples in a row, the prompt under
        it -> <directory>/<name>_step<step>.png; returns the path (None before any call, or with
        grid_prompts 0)."""
        if self.last_images is None or self.grid_prompts == 0:
            return None
        rows = list(self.last_images[: self.grid_prompts])
        labels = [f"{p} (held-out pair)" if h else p for p, h in zip(self.prompts, self.held_out)]
        path = os.path.join(directory, f"{self.name}_step{int(step)}.png")
        return draw.write_grid(path, rows, labels[: len(rows)])
