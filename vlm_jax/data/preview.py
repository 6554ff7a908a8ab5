"""`vlm-jax data preview`: a PNG grid of dataset samples with their captions, to look at the data."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data import pipeline, sources as sources_lib

CELL = 128  # pixels per image cell: world images are 32 px, too small to judge by eye
TEXT_LINES = 5  # caption lines under each cell (the last one ellipsised when the caption is longer)
_PAD = 4


def write_preview(
    config: Any,
    out_path: str | os.PathLike,
    *,
    split: str = "train",
    num: int = 16,
    tokenizer: Any = None,
    source: Any = None,
) -> str:
    """Writes a PNG grid of the first `num` examples (CELL px images, caption/label text); returns its path.

    Images are shown as the model gets them before normalisation (square crop, config size),
    upscaled with nearest-neighbour so pixels stay visible. With a tokenizer, each caption is
    shown as decoded from its config.data.text_length tokens, so truncation is visible too.
    Unreadable examples are shown as a grey cell with the reason.
    """
    source = sources_lib.make_source(config, split) if source is None else source
    num = max(1, min(int(num), len(source)))
    font = ImageFont.load_default()
    line_h = _line_height(font)
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    cell_h = CELL + _PAD + TEXT_LINES * line_h + _PAD
    grid = Image.new("RGB", (cols * CELL, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    size = int(config.data.image_size)
    for i in range(num):
        x, y = (i % cols) * CELL, (i // cols) * cell_h
        record = source[i]
        image = pipeline.load_image(record.get("image"))
        if image is None:
            grid.paste(Image.new("RGB", (CELL, CELL), (128, 128, 128)), (x, y))
            lines = ["<unreadable image>"]
        else:
            shown = pipeline._fit(image, size)  # the crop/resize the pipeline would apply
            grid.paste(Image.fromarray(np.ascontiguousarray(shown)).resize((CELL, CELL), Image.NEAREST), (x, y))
            lines = []
        lines += _describe(record, tokenizer, int(config.data.text_length))
        wrapped = _wrap(lines, font, draw, CELL - 2 * _PAD)
        if len(wrapped) > TEXT_LINES:
            wrapped = wrapped[:TEXT_LINES]
            wrapped[-1] = wrapped[-1][:-3] + "..."
        for j, line in enumerate(wrapped):
            draw.text((x + _PAD, y + CELL + _PAD + j * line_h), line, fill="black", font=font)
        # Thin separators so long captions do not read as the neighbour's.
        draw.rectangle((x, y, x + CELL - 1, y + cell_h - 1), outline=(200, 200, 200))
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    grid.save(out_path, format="PNG")
    return out_path


def _describe(record: dict[str, Any], tokenizer: Any, text_length: int) -> list[str]:
    """The text shown under a cell: label first (when present), then the first caption."""
    lines = []
    if "label" in record:
        name = record.get("label_name")
        lines.append(f"[{record['label']}] {name}" if name else f"[{record['label']}]")
    captions = [c for c in record.get("captions", ()) if isinstance(c, str) and c.strip()]
    if not captions:
        lines.append("<no caption>")
        return lines
    caption = captions[0]
    if tokenizer is not None:
        caption = tokenizer.decode(tokenizer.tokenize([caption], text_length)[0])
    extra = f" (+{len(captions) - 1} more)" if len(captions) > 1 else ""
    lines.append(caption + extra)
    return lines


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 2


def _wrap(lines: list[str], font: Any, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """Greedy word wrap of each line to a pixel width."""
    out = []
    for text in lines:
        current = ""
        for word in text.split():
            trial = f"{current} {word}" if current else word
            if draw.textlength(trial, font=font) <= width or not current:
                current = trial
            else:
                out.append(current)
                current = word
        out.append(current)
    return out
