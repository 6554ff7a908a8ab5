"""Is a captioner's attention grounded? For each generated colour or shape word, the share of its
attention mass that falls inside the box of the object it names.

A caption names an object with a colour word followed by a shape word ("a small *red circle*").
When the image holds exactly one object of that colour and shape, both words are scored against
its box: the attention with which each of the word's pieces was predicted (vlm_jax.sampling.
attention, a map over an h x w grid that tiles the image evenly), summed over the grid cells
weighted by the fraction of each cell inside the box, averaged over the word's pieces. A uniform
map puts exactly the box's share of the image area inside it, so that share is the chance level
the mass is compared with. Mentions of a pair the image does not hold (a wrong caption) or holds
more than once (ambiguous) are counted, not scored.

    score(maps, pieces, objects, image_size) -> list[Word]       one caption
    summarise(words, num_mentions...) -> dict                     over captions

Keys (under the evaluator's 'grounding/' prefix): mass_in_box and box_area (means over the scored
words), ratio (their quotient), the same for colour and shape words alone (colour/..., shape/...),
words (how many were scored), wrong_mentions and ambiguous_mentions (fractions of all colour-shape
mentions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm_jax.data import world

_PUNCTUATION = ".,;:!?"


@dataclasses.dataclass(frozen=True)
class Word:
    """One scored word: its text, kind ('colour' | 'shape'), attention mass inside the named
    object's box and the box's share of the image area."""

    text: str
    kind: str
    mass: float
    area: float


@dataclasses.dataclass
class Mentions:
    """Colour-shape mentions seen, and those not scored."""

    total: int = 0
    wrong: int = 0  # the image has no such object
    ambiguous: int = 0  # the image has several

    def add(self, other: Mentions) -> None:
        self.total += other.total
        self.wrong += other.wrong
        self.ambiguous += other.ambiguous


def words_of(pieces: Sequence[str]) -> list[tuple[str, list[int]]]:
    """sentencepiece pieces -> [(word, indices of its pieces)]: a piece starting with '▁' starts
    a word; punctuation is stripped from the word's text (and punctuation-only words dropped)."""
    words: list[tuple[str, list[int]]] = []
    for i, piece in enumerate(pieces):
        if piece.startswith("\u2581") or not words:
            words.append((piece.lstrip("\u2581"), [i]))
        else:
            text, idx = words[-1]
            words[-1] = (text + piece, idx + [i])
    out = []
    for text, idx in words:
        text = text.strip(_PUNCTUATION).lower()
        if text:
            out.append((text, idx))
    return out


def mass_in_box(grid: np.ndarray, box: Sequence[int], image_size: int) -> float:
    """Attention grid f32 [h, w] over an image_size-pixel square; box (x0, y0, x1, y1), ends
    exclusive, in pixels -> the mass inside the box (cells weighted by their overlap with it)."""
    h, w = grid.shape
    x0, y0, x1, y1 = box

    def overlap(n: int, lo: float, hi: float) -> np.ndarray:
        edges = np.arange(n + 1) * (image_size / n)
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) / (image_size / n)

    return float(np.einsum("hw,h,w->", grid, overlap(h, y0, y1), overlap(w, x0, x1)))


def box_area(box: Sequence[int], image_size: int) -> float:
    x0, y0, x1, y1 = box
    return max(x1 - x0, 0) * max(y1 - y0, 0) / float(image_size * image_size)


def score(
    maps: np.ndarray, pieces: Sequence[str], objects: Sequence[dict[str, Any]], image_size: int
) -> tuple[list[Word], Mentions]:
    """One caption: maps f32 [T, h, w] (row j: the attention that predicted piece j), pieces (its
    generated pieces, eos excluded, len <= T), the image's objects (color, shape, box) ->
    (scored words, mention counts)."""
    words = words_of(pieces)
    scored: list[Word] = []
    counts = Mentions()
    for (first, idx_a), (second, idx_b) in zip(words, words[1:]):
        if first not in world.COLORS or second not in world.SHAPES:
            continue
        counts.total += 1
        named = [o for o in objects if o["color"] == first and o["shape"] == second]
        if not named:
            counts.wrong += 1
            continue
        if len(named) > 1:
            counts.ambiguous += 1
            continue
        box = named[0]["box"]
        area = box_area(box, image_size)
        for text, kind, idx in ((first, "colour", idx_a), (second, "shape", idx_b)):
            mass = float(np.mean([mass_in_box(maps[j], box, image_size) for j in idx]))
            scored.append(Word(text, kind, mass, area))
    return scored, counts


def summarise(words: Sequence[Word], mentions: Mentions) -> dict[str, float]:
    """Means over the scored words (see the module docstring for the keys)."""
    out: dict[str, float] = {"words": float(len(words))}
    for prefix, subset in (("", words), ("colour/", [w for w in words if w.kind == "colour"]),
                           ("shape/", [w for w in words if w.kind == "shape"])):
        if not subset:
            continue
        mass = float(np.mean([w.mass for w in subset]))
        area = float(np.mean([w.area for w in subset]))
        out.update({f"{prefix}mass_in_box": mass, f"{prefix}box_area": area, f"{prefix}ratio": mass / max(area, 1e-12)})
    if mentions.total:
        out["wrong_mentions"] = mentions.wrong / mentions.total
        out["ambiguous_mentions"] = mentions.ambiguous / mentions.total
    return out
