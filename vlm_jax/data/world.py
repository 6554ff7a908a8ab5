"""The built-in synthetic world: coloured shapes on a dark background, with texts and splits.

Every example is a pure function of (seed, split, index): a scene of 1-3 objects (one large
main object that gives the class label, 0-2 small ones) on a 3x3 grid of positions, rendered
at any resolution, with captions, question/answer pairs and a short conversation. Training
never shows the HELD_OUT_PAIRS; validation and test draw half of their main objects from
them, so models are scored on colour-shape combinations they have never seen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
# No colour starts with a vowel, so "a {colour} {shape}" is always grammatical and the
# zero-shot templates below read exactly like the captions.
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "pink")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 230, 50),
    "cyan": (40, 220, 230),
    "magenta": (220, 40, 220),
    "white": (245, 245, 245),
    "pink": (255, 150, 195),
}
BACKGROUND: tuple[int, int, int] = (18, 18, 26)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
CLASS_NAMES: list[str] = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
# One pair per colour on a diagonal, so each shape keeps >= 6 training colours and each
# colour keeps 5 training shapes.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (color, SHAPES[i % len(SHAPES)]) for i, color in enumerate(COLORS)
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
PROMPT_TEMPLATES: tuple[str, ...] = ("a {}.", "a picture of a {}.", "an image with a {}.", "there is a {}.")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SIZES: dict[str, int] = {"train": 50000, "validation": 2000, "test": 2000}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")

GRID = 3
# Half-sizes as a fraction of the image side. With cells of 1/3, a large and a small object
# in neighbouring cells keep a gap of >= 0.06 (2 pixels at 32x32), so components never touch.
HALF_SIZE: dict[str, float] = {"small": 0.11, "large": 0.16}


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u right, v down, in [-1, 1]) lie in the unit shape: bool like u."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.9
    if shape == "triangle":  # apex up
        return (v >= -1.0) & (v <= 0.85) & (au <= (v + 1.0) / 1.85)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return (np.minimum(au, av) <= 0.34) & (np.maximum(au, av) <= 1.0)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# Tight extent (u0, u1, v0, v1) of each unit shape, so a shape can be fitted to a box.
_EXTENT: dict[str, tuple[float, float, float, float]] = {
    "square": (-0.9, 0.9, -0.9, 0.9),
    "triangle": (-1.0, 1.0, -1.0, 0.85),
}


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """The shape stretched to fill a height x width box: bool [height, width]."""
    u0, u1, v0, v1 = _EXTENT.get(shape, (-1.0, 1.0, -1.0, 1.0))
    u = u0 + (np.arange(width) + 0.5) / width * (u1 - u0)
    v = v0 + (np.arange(height) + 0.5) / height * (v1 - v0)
    return _inside(shape, u[None, :], v[:, None])


def position_center(position: str) -> tuple[float, float]:
    """Centre (x, y) of a named grid cell, as fractions of the image side."""
    row, col = divmod(POSITIONS.index(position), GRID)
    return (col + 0.5) / GRID, (row + 0.5) / GRID


@functools.lru_cache(maxsize=4096)
def _placed_mask(shape: str, size: str, position: str, image_size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Rasterised object: (bool mask [y1-y0, x1-x0], box (x0, y0, x1, y1)) in pixels."""
    cx, cy = position_center(position)
    half = HALF_SIZE[size] * image_size
    # Centres on pixel corners make every object symmetric and identical in all cells;
    # sampling pixel centres (no anti-aliasing) keeps colours exact for the scorer.
    coords = np.arange(image_size) + 0.5
    u = (coords - round(cx * image_size)) / half
    v = (coords - round(cy * image_size)) / half
    mask = _inside(shape, u[None, :], v[:, None])
    if not mask.any():
        raise ValueError(f"image_size {image_size} is too small to draw a {size} {shape}")
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = mask[y0:y1, x0:x1].copy()
    crop.setflags(write=False)
    return crop, (x0, y0, x1, y1)


def object_mask(obj: dict[str, Any], image_size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pixels an object covers at image_size: (read-only bool [y1-y0, x1-x0], box (x0, y0, x1, y1))."""
    return _placed_mask(obj["shape"], obj["size"], obj["position"], image_size)


def object_box(obj: dict[str, Any], image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), ends exclusive, of an object rendered at image_size."""
    return _placed_mask(obj["shape"], obj["size"], obj["position"], image_size)[1]


def render(objects: list[dict[str, Any]], image_size: int = 32) -> np.ndarray:
    """Draw objects ({shape, color, size, position}) on the background: uint8 [S, S, 3]."""
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[...] = BACKGROUND
    for obj in objects:
        mask, (x0, y0, x1, y1) = _placed_mask(obj["shape"], obj["size"], obj["position"], image_size)
        image[y0:y1, x0:x1][mask] = PALETTE[obj["color"]]
    return image


def num_examples(split: str) -> int:
    """Default number of examples in a split."""
    return SPLIT_SIZES[_check_split(split)]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # SeedSequence mixes the three integers, so neighbouring indices give unrelated scenes.
    return np.random.default_rng([int(seed), SPLITS.index(_check_split(split)), int(index)])


def _pick(rng: np.random.Generator, items: tuple | list) -> Any:
    return items[int(rng.integers(len(items)))]


def sample_scene(rng: np.random.Generator, split: str) -> list[dict[str, Any]]:
    """Draw 1-3 objects {shape, color, size, position}, main (large) first, for a split."""
    n = int(rng.integers(1, 4))
    if split == "train":
        main, others = _pick(rng, TRAIN_PAIRS), TRAIN_PAIRS
    else:
        main = _pick(rng, HELD_OUT_PAIRS if rng.random() < 0.5 else TRAIN_PAIRS)
        others = ALL_PAIRS
    # Distinct pairs in a scene make "the red circle" name one object in texts.
    pairs = [main]
    while len(pairs) < n:
        pair = _pick(rng, others)
        if pair not in pairs:
            pairs.append(pair)
    cells = rng.permutation(len(POSITIONS))[:n]
    return [
        {"shape": s, "color": c, "size": "large" if i == 0 else "small", "position": POSITIONS[int(cells[i])]}
        for i, (c, s) in enumerate(pairs)
    ]


def _name(obj: dict[str, Any], size: bool = False, position: bool = False) -> str:
    text = f"{obj['color']} {obj['shape']}"
    if size:
        text = f"{obj['size']} {text}"
    if position:
        text = f"{text} {POSITION_PHRASES[obj['position']]}"
    return text


def _join(phrases: list[str]) -> str:
    phrases = [f"a {p}" for p in phrases]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions(objects: list[dict[str, Any]]) -> list[str]:
    """Six phrasings, main object first, in <= 14 words.

    Four name every object; the last two, as people describe a busy picture, name only the main
    (large) object: "a large red circle and two small shapes." and "the large shape is a red
    circle.".
    """
    plain = _join([_name(o) for o in objects])
    sized = _join([_name(o, size=True) for o in objects])
    placed = _join([_name(objects[0], position=True)] + [_name(o) for o in objects[1:]])
    others = len(objects) - 1
    if others:
        salient = f"a {_name(objects[0], size=True)} and {NUMBER_WORDS[others]} small shape{'s' * (others > 1)}."
    else:
        salient = f"one shape: {plain}."
    # Three objects leave no room for a lead-in within ~13 words.
    short = len(objects) == 3
    return [
        f"{plain}.",
        f"a picture of {plain}.",
        f"{sized}." if short else f"an image with {sized}.",
        f"{placed}." if short else f"there is {placed}.",
        salient,
        f"the large shape is a {_name(objects[0])}.",
    ]


def _allowed_pairs(split: str) -> tuple[tuple[str, str], ...]:
    # Training texts never name a held-out pair, not even in a negative.
    return TRAIN_PAIRS if split == "train" else ALL_PAIRS


def negative_scene(rng: np.random.Generator, objects: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The scene with its attributes wrongly bound: a hard negative for contrastive training.

    With two or more objects, the main object swaps its colour or its shape with another
    object's ("a red square and a blue circle" becomes "a blue square and a red circle"), so
    the words stay the same and only who-has-what changes. Where no swap gives nameable
    (for training: non-held-out), distinct pairs, and for single objects, the main object gets
    another colour or shape instead. Sizes and positions are kept, so every caption phrasing
    has its negative.
    """
    allowed = set(_allowed_pairs(split))
    pairs = [(o["color"], o["shape"]) for o in objects]
    candidates = []
    for j in range(1, len(objects)):
        for attr in (0, 1):  # 0: colour, 1: shape
            if pairs[0][attr] == pairs[j][attr]:
                continue
            new = list(pairs)
            a, b = list(new[0]), list(new[j])
            a[attr], b[attr] = b[attr], a[attr]
            new[0], new[j] = tuple(a), tuple(b)
            if set(new) <= allowed and len(set(new)) == len(new):
                candidates.append(new)
    if not candidates:
        main_color, main_shape = pairs[0]
        for pair in sorted(allowed - set(pairs)):
            if (pair[0] == main_color) != (pair[1] == main_shape):  # exactly one attribute changed
                candidates.append([pair] + pairs[1:])
    new = candidates[int(rng.integers(len(candidates)))]
    return [{**o, "color": c, "shape": s} for o, (c, s) in zip(objects, new)]


def _description(objects: list[dict[str, Any]]) -> str:
    listed = _join([_name(o, size=True, position=True) for o in objects])
    if len(objects) == 1:
        return f"there is one shape: {listed}."
    return f"there are {NUMBER_WORDS[len(objects)]} shapes: {listed}."


def _questions(rng: np.random.Generator, objects: list[dict[str, Any]], split: str) -> list[tuple[str, str, str]]:
    """(question, short answer, sentence answer) triples about a scene."""
    main, n = objects[0], len(objects)
    noun = "object" if rng.random() < 0.5 else "shape"
    count = f"{'are' if n > 1 else 'is'} {NUMBER_WORDS[n]} {noun}{'s' if n > 1 else ''}"
    out = [
        (f"how many {noun}s are there?", NUMBER_WORDS[n], f"there {count}."),
        (f"what colour is the large {noun}?", main["color"], f"the large {noun} is {main['color']}."),
        ("what shape is the large object?", main["shape"], f"the large object is a {main['shape']}."),
    ]
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        c, s = _pick(rng, sorted(present))
        out.append((f"is there a {c} {s}?", "yes", f"yes, there is a {c} {s}."))
    else:
        # Training texts never name a held-out pair, not even to deny it.
        pool = [p for p in (TRAIN_PAIRS if split == "train" else ALL_PAIRS) if p not in present]
        c, s = _pick(rng, pool)
        out.append((f"is there a {c} {s}?", "no", f"no, there is no {c} {s}."))
    obj = _pick(rng, objects)
    where = POSITION_PHRASES[obj["position"]]
    out.append((f"where is the {_name(obj)}?", obj["position"], f"the {_name(obj)} is {where}."))
    obj = _pick(rng, objects)
    out.append((f"what size is the {_name(obj)}?", obj["size"], f"the {_name(obj)} is {obj['size']}."))
    return out


def texts(rng: np.random.Generator, objects: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Captions, their hard negatives, qa [{question, answer}] and conversation [{role, text}]."""
    triples = _questions(rng, objects, split)
    opener = _pick(rng, ("describe the image.", "what do you see?", "what is in this picture?"))
    conversation = [{"role": "user", "text": opener}, {"role": "assistant", "text": _description(objects)}]
    if rng.random() < 0.5:
        question, _, sentence = _pick(rng, triples)
        conversation += [{"role": "user", "text": question}, {"role": "assistant", "text": sentence}]
    return {
        "captions": captions(objects),
        "negative_captions": captions(negative_scene(rng, objects, split)),
        "qa": [{"question": q, "answer": a} for q, a, _ in triples],
        "conversation": conversation,
    }


def label_of(color: str, shape: str) -> int:
    """Class index of a colour-shape pair in CLASS_NAMES."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def example(index: int, split: str, *, seed: int = 0, image_size: int = 32) -> dict[str, Any]:
    """One example of the world: image uint8 [S, S, 3], texts, label and objects with boxes."""
    rng = _rng(seed, split, index)
    objects = sample_scene(rng, split)
    text = texts(rng, objects, split)
    main = objects[0]
    for obj in objects:
        obj["box"] = object_box(obj, image_size)
    return {
        "image": render(objects, image_size),
        "captions": text["captions"],
        # negative_captions[i] is captions[i] with the attributes wrongly bound (hard negatives).
        "negative_captions": text["negative_captions"],
        "label": label_of(main["color"], main["shape"]),
        "label_name": f"{main['color']} {main['shape']}",
        "held_out": (main["color"], main["shape"]) in HELD_OUT_PAIRS,
        "objects": objects,
        "qa": text["qa"],
        "conversation": text["conversation"],
    }


def text_corpus(seed: int = 0, num: int = 5000) -> Iterator[str]:
    """Texts for training a tokenizer: every text of `num` train scenes, then filled prompts."""
    for index in range(num):
        rng = _rng(seed, "train", index)
        objects = sample_scene(rng, "train")
        text = texts(rng, objects, "train")
        yield from text["captions"]
        for qa in text["qa"]:
            yield qa["question"]
            yield qa["answer"]
        for turn in text["conversation"]:
            yield turn["text"]
    # Class names of held-out pairs too: zero-shot prompts must tokenise like the rest.
    for template in PROMPT_TEMPLATES:
        for name in CLASS_NAMES:
            yield template.format(name)


# ----------------------------------------------------------------------------- instructions
# A small instruction set in the Alpaca format ({instruction, input, output}): questions about a
# scene given as text (its description is the input), and arithmetic without an input. Items of
# the validation and test splits are held out: their scenes are new (half with a held-out main
# colour-shape pair) and their arithmetic uses operand pairs that training never shows.

INSTRUCTION_KINDS: tuple[str, ...] = (
    "count", "colour_of", "shape_of", "where", "exists", "large", "list_colours", "arithmetic",
)  # fmt: skip
ARITHMETIC_MAX = 12  # operands 0..12


def arithmetic_held_out(a: int, b: int, op: str) -> bool:
    """Whether an arithmetic item (a op b) is held out of training: about one pair in seven."""
    return (3 * a + 5 * b + (op == "minus")) % 7 == 0


def _arithmetic(rng: np.random.Generator, split: str) -> dict[str, str]:
    """{instruction, input '', output, expr} for a sum or difference (never negative)."""
    while True:
        op = "plus" if rng.random() < 0.5 else "minus"
        a, b = int(rng.integers(ARITHMETIC_MAX + 1)), int(rng.integers(ARITHMETIC_MAX + 1))
        if op == "minus" and b > a:
            a, b = b, a
        if arithmetic_held_out(a, b, op) == (split != "train"):
            break
    phrasing = _pick(rng, ("what is {} {} {}?", "compute {} {} {}.", "how much is {} {} {}?"))
    return {
        "instruction": phrasing.format(a, op, b),
        "input": "",
        "output": str(a + b if op == "plus" else a - b),
        "expr": f"{a} {op} {b}",
    }


def _unique(objects: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    values = [o[key] for o in objects]
    return [o for o in objects if values.count(o[key]) == 1]


def _scene_instruction(
    rng: np.random.Generator, objects: list[dict[str, Any]], kind: str, split: str
) -> dict[str, str]:
    """One question about the scene; the scene's description is the input."""
    scene = _description(objects)
    main, n = objects[0], len(objects)
    noun = "shapes" if rng.random() < 0.5 else "objects"
    if kind == "count":
        q, a = f"how many {noun} are there?", NUMBER_WORDS[n]
    elif kind == "colour_of" and _unique(objects, "shape"):
        obj = _pick(rng, _unique(objects, "shape"))
        q, a = f"what colour is the {obj['shape']}?", obj["color"]
    elif kind == "shape_of" and _unique(objects, "color"):
        obj = _pick(rng, _unique(objects, "color"))
        q, a = f"what shape is the {obj['color']} object?", obj["shape"]
    elif kind == "where":
        obj = _pick(rng, objects)
        q, a = f"where is the {_name(obj)}?", obj["position"]
    elif kind == "exists":
        present = {(o["color"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            (c, s), a = _pick(rng, sorted(present)), "yes"
        else:
            pool = [p for p in _allowed_pairs(split) if p not in present]
            (c, s), a = _pick(rng, pool), "no"
        q = f"is there a {c} {s}?"
    elif kind == "large":
        q, a = f"which of the {noun} is large?", f"the {_name(main)}"
    elif kind == "list_colours":
        q, a = "list the colours from the first shape to the last.", _join_plain([o["color"] for o in objects])
    elif kind in ("colour_of", "shape_of"):
        # Every object shares the asked-about attribute: nothing names one object; count instead.
        return _scene_instruction(rng, objects, "count", split)
    else:
        raise ValueError(f"unknown scene instruction kind {kind!r}")
    return {"instruction": q, "input": scene, "output": a}


def _join_plain(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def instruction_example(index: int, split: str, *, seed: int = 0) -> dict[str, Any]:
    """Instruction item `index` of a split: {instruction, input, output, kind, held_out}.

    held_out: the item names a held-out colour-shape pair or is a held-out arithmetic pair (for
    validation and test every item is new; this marks the ones that are new in kind as well).
    """
    rng = np.random.default_rng([int(seed), SPLITS.index(_check_split(split)), int(index), 7])
    kind = _pick(rng, INSTRUCTION_KINDS)
    if kind == "arithmetic":
        item = _arithmetic(rng, split)
        del item["expr"]
        held = split != "train"
    else:
        objects = sample_scene(rng, split)
        item = _scene_instruction(rng, objects, kind, split)
        held = any((o["color"], o["shape"]) in HELD_OUT_PAIRS for o in objects)
    return {**item, "kind": kind, "held_out": bool(held)}


def lm_document(index: int, *, seed: int = 0) -> str:
    """A training document of plain text for language-model pretraining: everything said about one
    train scene (description, captions, questions with answers, the conversation) and a few sums.

    It uses the words and facts of the instruction set but never its prompt format, so a model
    pretrained on it alone has not learned to follow instructions.
    """
    rng = np.random.default_rng([int(seed), 0, int(index), 11])
    objects = sample_scene(rng, "train")
    text = texts(rng, objects, "train")
    parts = [_description(objects), _pick(rng, text["captions"])]
    parts += [f"{qa['question']} {qa['answer']}." for qa in text["qa"]]
    parts += [turn["text"] for turn in text["conversation"]]
    for _ in range(2):
        item = _arithmetic(rng, "train")
        parts.append(f"{item['expr']} is {item['output']}.")
    return " ".join(parts)
