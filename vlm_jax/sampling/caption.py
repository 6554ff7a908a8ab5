"""Captioning an image file with a trained captioner, and a figure of where it looked.

    vlm-jax sample --workdir runs/sat --image scene.png [--attention-png scene_attention.png]

caption_image(workdir, image, ...) restores the run (sample.load_for_sampling), fits the image to
the run's size the way the evaluators do (centre square crop, resize, normalise), decodes one
caption (config.decode's method, beam size and length unless given) and returns it with its ids.
For a model with attention over the image (Show, Attend and Tell; CoCa, through its captioning
pooler) it also computes, per generated piece, the attention map with which it was predicted
(sampling.attention), and `attention_png` writes the paper-style figure: the image, then one panel
per generated word (its pieces' maps averaged), the map upsampled to the image and laid over it,
the word under the panel.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import ml_collections
import numpy as np

PANEL = 128  # pixels per panel side in the figure
COLUMNS = 6


def caption_image(
    workdir: str,
    image: Any,
    *,
    config: ml_collections.ConfigDict | None = None,
    method: str | None = None,
    beam_size: int | None = None,
    max_new_tokens: int | None = None,
    step: int | None = None,
    attention_png: str | None = None,
    out: TextIO | None = sys.stdout,
) -> dict[str, Any]:
    """-> {"caption": str, "ids": [int], "maps": f32 [T, h, w] or None, "png": path or None}."""
    from vlm_jax.data import pipeline
    from vlm_jax.evals import grounding
    from vlm_jax.sampling import attention, decode, sample

    config, model, params, tokenizer = sample.load_for_sampling(workdir, config, step=step)
    if str(config.task.get("name", "")) not in sample.CAPTION_TASKS:
        raise ValueError(f"--image needs a captioning run (task caption or coca), not {config.task.get('name')!r}")
    decode_cfg = config.get("decode") or {}
    method = method or str(decode_cfg.get("method", "greedy"))
    beam_size = int(beam_size or decode_cfg.get("beam_size", 3))
    max_new_tokens = int(max_new_tokens or decode_cfg.get("max_new_tokens", int(config.data.text_length) - 1))
    raw = pipeline.load_image(image)
    if raw is None:
        raise ValueError(f"cannot read the image {image!r}")
    size = int(config.data.image_size)
    pixels = pipeline.preprocess_images([raw], config)
    (ids,) = decode.generate(
        decode.decoder_for(model), params, [[tokenizer.bos_id]], max_new_tokens=max_new_tokens, method=method,
        beam_size=beam_size, stop_tokens=(tokenizer.eos_id,), pad_id=max(tokenizer.pad_id, 0), context=pixels,
    )
    ids = [int(i) for i in ids]
    caption = tokenizer.decode(ids)
    if out is not None:
        out.write(caption + "\n")
        out.flush()
    result: dict[str, Any] = {"caption": caption, "ids": ids, "maps": None, "png": None}
    if attention.has_image_attention(model):
        pieces = tokenizer.pieces(ids)
        tokens = np.asarray([[tokenizer.bos_id] + ids[: len(pieces)]], np.int32)
        result["maps"] = attention.image_attention(model, params, pixels, tokens)[0, : len(pieces)]
        if attention_png:
            shown = pipeline._fit(raw, size)
            words = [(w, result["maps"][idx].mean(axis=0)) for w, idx in grounding.words_of(pieces)]
            render_attention(shown, words, attention_png)
            result["png"] = attention_png
            if out is not None:
                out.write(f"attention maps: {attention_png}\n")
    elif attention_png:
        raise ValueError(f"{type(model).__name__} has no attention over the image to draw")
    return result


def render_attention(image: np.ndarray, words: list[tuple[str, np.ndarray]], path: str) -> None:
    """uint8 [S, S, 3] image and (word, map f32 [h, w]) pairs -> a PNG grid: the image, then per
    word the map (bilinear to the panel, scaled to its max) blended over the darkened image."""
    from PIL import Image, ImageDraw

    base = Image.fromarray(np.asarray(image, np.uint8)).resize((PANEL, PANEL), Image.NEAREST)
    panels = [("(image)", base)]
    dark = np.asarray(base, np.float32) * 0.35
    for word, grid in words:
        heat = Image.fromarray(np.asarray(grid, np.float32)).resize((PANEL, PANEL), Image.BILINEAR)
        heat = np.asarray(heat, np.float32)
        heat = heat / max(float(heat.max()), 1e-12)
        over = dark + heat[..., None] * np.asarray(base, np.float32) * 0.65 + heat[..., None] * 90.0
        panels.append((word, Image.fromarray(np.clip(over, 0, 255).astype(np.uint8))))
    label = 16
    cols = min(COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (cols * (PANEL + 4), rows * (PANEL + label + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (word, panel) in enumerate(panels):
        x, y = (k % cols) * (PANEL + 4), (k // cols) * (PANEL + label + 4)
        sheet.paste(panel, (x, y))
        draw.text((x + 2, y + PANEL + 2), word, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
