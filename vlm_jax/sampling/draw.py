"""Drawing images from text with a text-to-image model, and PNG grids of them.

A text-to-image task module (vlm_jax/tasks/<name>.py) defines, beside model_inputs and loss_fn,

    generate(model, variables, tokens, rng, config) -> float32 [B, S, S, 3]

images in the data's normalisation (data.pipeline.normalise) for tokens int32 [B, L] from the
run's tokenizer at config.data.text_length, variables = {"params": params, **model_state}, rng a
jax PRNG key. It jits what it runs itself (a sampler may loop in Python over jitted steps).
`generate_images` calls it in fixed-size batches (the last one padded, so one shape compiles) and
turns the result into uint8 pixels; the evaluator of kind `generation` (evals.generation) and
sampling.images (the image path of `vlm-jax sample`) both go through it.

Grids: one row per prompt, its images along the row, upscaled by whole factors (nearest, so the
pixels stay crisp) to at least CELL pixels, and the prompt written under the row in PIL's default
font.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data.normalise import denormalise

CELL = 64  # smallest side, in pixels, of an image in a grid
_GAP = 4  # pixels between images and around the text


class PromptError(ValueError):
    """A prompt a run cannot draw from: empty, or longer than its text length."""


def text_to_image_task(config: ml_collections.ConfigDict) -> ModuleType:
    """The run's task module (vlm_jax.tasks.<config.task.name>); ValueError when it has no generate."""
    from vlm_jax import tasks

    name = str(config.task.get("name", ""))
    task = tasks.get(name)
    if not callable(getattr(task, "generate", None)):
        raise ValueError(
            f"task {name!r} draws no images: vlm_jax/tasks/{name}.py has no "
            "generate(model, variables, tokens, rng, config)"
        )
    return task


def has_generate(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's task is text-to-image (its module defines generate)."""
    from vlm_jax import tasks

    return callable(getattr(tasks.get(str(config.task.get("name", ""))), "generate", None))


def as_variables(params: Any) -> dict:
    """What sample.load_for_sampling returns (params, or a variables dict {"params", "batch_stats",
    ...} for a model with state) -> a variables dict."""
    if isinstance(params, dict) and "params" in params:
        return dict(params)
    return {"params": params}


def check_prompt(prompt: Any) -> str:
    """The prompt, or PromptError when it is not text or holds nothing but spaces."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty prompt: say what to draw, e.g. 'a large red circle on the left'")
    return prompt


def prompt_tokens(tokenizer: Any, prompts: Sequence[str], length: int) -> np.ndarray:
    """Prompts -> int32 [P, length] rows ([bos] + pieces + [eos] + pad). PromptError for an empty
    prompt and for one whose pieces do not fit `length` (never silently cut)."""
    for prompt in prompts:
        check_prompt(prompt)
    tokens, truncated = tokenizer.tokenize(list(prompts), int(length), return_truncated=True)
    if truncated.any():
        long = prompts[int(np.argmax(truncated))]
        pieces = len(tokenizer.encode(long))
        raise PromptError(
            f"prompt {long!r} is {pieces} pieces long; with bos and eos the run's text length "
            f"{length} holds at most {length - 2}"
        )
    return np.asarray(tokens, np.int32)


def output_size(task: ModuleType, config: ml_collections.ConfigDict) -> int:
    """The side of the images task.generate draws: task.output_size(config) where the task defines
    it (the unCLIP decoder draws below data.image_size), else config.data.image_size."""
    own = getattr(task, "output_size", None)
    return int(own(config)) if own is not None else int(config.data.image_size)


def generate_images(
    task: ModuleType, model: Any, variables: dict, tokens: np.ndarray, rng: jax.Array,
    config: ml_collections.ConfigDict, batch_size: int,
) -> np.ndarray:
    """task.generate over tokens int32 [B, L] in batches of batch_size rows (batch i gets
    fold_in(rng, i); the last batch padded with copies of its last row) -> uint8 [B, S, S, 3] (S:
    output_size)."""
    size = output_size(task, config)
    batch_size = max(1, min(int(batch_size), len(tokens)))
    out = []
    for i, start in enumerate(range(0, len(tokens), batch_size)):
        batch = tokens[start : start + batch_size]
        rows = len(batch)
        if rows < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
        images = np.asarray(task.generate(model, variables, batch, jax.random.fold_in(rng, i), config))
        if images.shape != (batch_size, size, size, 3):
            raise ValueError(
                f"{task.__name__}.generate gave images of shape {images.shape} for {batch_size} prompts; "
                f"expected {(batch_size, size, size, 3)} (the task's output size {size})"
            )
        out.append(denormalise(images[:rows], config))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def grid(rows: Sequence[np.ndarray], labels: Sequence[str], cell: int = CELL) -> Image.Image:
    """rows: per prompt uint8 [n, S, S, 3] (n may differ), labels: one text per row -> an RGB
    image: each row's images side by side, its label under it."""
    if len(rows) != len(labels) or not rows:
        raise ValueError(f"a grid needs one label per row and at least one row ({len(rows)} rows, {len(labels)} labels)")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(int(probe.textbbox((0, 0), "Ag", font=font)[3]), 1)
    side = int(rows[0].shape[1])
    scale = max(1, -(-cell // side))
    shown = side * scale
    widths = [len(r) * (shown + _GAP) + _GAP for r in rows]
    widths += [int(probe.textlength(label, font=font)) + 2 * _GAP for label in labels]
    row_h = _GAP + shown + _GAP + text_h + _GAP
    canvas = Image.new("RGB", (max(widths), len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (images, label) in enumerate(zip(rows, labels)):
        y = r * row_h + _GAP
        for j, image in enumerate(np.asarray(images, np.uint8)):
            tile = Image.fromarray(np.ascontiguousarray(image)).resize((shown, shown), Image.NEAREST)
            canvas.paste(tile, (_GAP + j * (shown + _GAP), y))
        draw.text((_GAP, y + shown + _GAP), label, fill="black", font=font)
    return canvas


def write_grid(path: str | os.PathLike, rows: Sequence[np.ndarray], labels: Sequence[str], cell: int = CELL) -> str:
    """Writes grid(rows, labels, cell) as a PNG (folders made as needed); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid(rows, labels, cell).save(path, format="PNG")
    return path
