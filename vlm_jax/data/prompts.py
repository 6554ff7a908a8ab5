"""Reading a text prompt back into the world's objects: the inverse of `world.captions`.

    parse_caption("a large red circle on the left.")
        -> [{"color": "red", "shape": "circle", "size": "large", "position": "left"}]
    parse_caption("a large red circle and two small shapes.")
        -> [{"size": "large", "color": "red", "shape": "circle"}, {"size": "small"}, {"size": "small"}]

An object gets the attributes the text names and no others (colour and shape always in the
world's captions; size and position only where a phrasing names them), main object first, so
`data.scorer` can judge an image against exactly what was asked for. The grammar is that of the
six caption phrasings, and the prompts people write in the same words:

    prompt  := [lead-in] object ("," object)* ["and" object] ["."]
    lead-in := "a picture of" | "an image with" | "there is" | "there are" | "one shape:"
             | "the large shape is"
    object  := ["a" | "an" | number] size? colour? (shape | "shape(s)" | "object(s)") [position]

with the world's words (world.SIZES, COLORS, SHAPES, POSITION_PHRASES; "centre" for "center",
plural shapes such as "circles"); a number word (one .. three) repeats the object. Every prompt
names all the objects of the picture except "the large shape is ...", which names only the main
object (`parse_prompt(...).exact_count` is False there). Anything else is a ValueError that
names the word it could not read.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from vlm_jax.data import world

LEAD_INS: tuple[str, ...] = (
    "a picture of", "an image with", "there is", "there are", "one shape:", "the large shape is",
)  # fmt: skip
_ARTICLES = ("a", "an")
_NOUNS = ("shape", "shapes", "object", "objects")
_NUMBERS = {word: n for n, word in enumerate(world.NUMBER_WORDS) if n > 0}
_PLURALS = {f"{shape}es" if shape.endswith("s") else f"{shape}s": shape for shape in world.SHAPES}
_PLACES = {phrase: position for position, phrase in world.POSITION_PHRASES.items()}
_PLACES.update({phrase.replace("center", "centre"): position for phrase, position in list(_PLACES.items())})


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A parsed prompt: objects (main first, each with only the attributes named) and whether the
    text names every object of the picture (False: others may be there)."""

    objects: list[dict[str, Any]]
    exact_count: bool


def _object(words: list[str], text: str) -> list[dict[str, Any]]:
    """One object phrase as words -> its object(s): [] never (an empty phrase is an error)."""
    if not words:
        raise ValueError(f"prompt {text!r}: an empty object phrase (a stray 'and' or comma?)")
    count, rest = 1, list(words)
    if rest[0] in _ARTICLES:
        rest = rest[1:]
    elif rest[0] in _NUMBERS:
        count, rest = _NUMBERS[rest[0]], rest[1:]
    obj: dict[str, Any] = {}
    while rest and (rest[0] in world.SIZES or rest[0] in world.COLORS):
        key = "size" if rest[0] in world.SIZES else "color"
        if key in obj:
            raise ValueError(f"prompt {text!r}: two {key}s for one object ({obj[key]!r}, {rest[0]!r})")
        obj[key] = rest.pop(0)
    if not rest:
        raise ValueError(f"prompt {text!r}: {' '.join(words)!r} names no shape (one of {world.SHAPES})")
    noun = rest.pop(0)
    if noun in world.SHAPES or noun in _PLURALS:
        obj["shape"] = _PLURALS.get(noun, noun)
    elif noun not in _NOUNS:
        raise ValueError(
            f"prompt {text!r}: unknown word {noun!r} (expected a shape {world.SHAPES}, a size "
            f"{world.SIZES} or a colour {world.COLORS})"
        )
    if rest:
        place = " ".join(rest)
        if place not in _PLACES:
            raise ValueError(
                f"prompt {text!r}: unknown words {place!r} after {noun!r} (a position is one of "
                f"{sorted(set(world.POSITION_PHRASES.values()))})"
            )
        obj["position"] = _PLACES[place]
    return [dict(obj) for _ in range(count)]


def parse_prompt(text: str) -> Prompt:
    """A caption or prompt -> Prompt(objects, exact_count); see the module docstring for the grammar.
    Raises ValueError for an empty text and for any word outside it."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt is text, not {type(text).__name__}")
    clean = " ".join(text.lower().replace(",", " , ").split())
    clean = clean[:-1].rstrip() if clean.endswith(".") else clean
    if not clean:
        raise ValueError("empty prompt: name at least one object, e.g. 'a red circle'")
    lead = next((lead for lead in LEAD_INS if clean == lead or clean.startswith(lead + " ")), None)
    body = clean[len(lead):].strip() if lead else clean
    if not body:
        raise ValueError(f"prompt {text!r} names no object after {lead!r}")
    phrases = [p.split() for p in re.split(r" *, *(?:and )?| and ", body)]
    objects = [obj for words in phrases for obj in _object(words, text)]
    if lead == "the large shape is":
        if len(objects) != 1:
            raise ValueError(f"prompt {text!r}: 'the large shape is' names one object, not {len(objects)}")
        if objects[0].get("size", "large") != "large":
            raise ValueError(f"prompt {text!r}: the large shape cannot be {objects[0]['size']}")
        objects[0] = {"size": "large", **objects[0]}
    if lead == "one shape:" and len(objects) != 1:
        raise ValueError(f"prompt {text!r}: 'one shape:' names {len(objects)} objects")
    return Prompt(objects=objects, exact_count=lead != "the large shape is")


def parse_caption(text: str) -> list[dict[str, Any]]:
    """A caption or prompt -> its objects, main first, each with only the attributes the text
    names ({color, shape} and, where named, size and position); ValueError for unknown words."""
    return parse_prompt(text).objects
