"""Fixed-length token rows, as every model reads text: [bos] + pieces + [eos] + pad ..., shared by
the sentencepiece tokenizer (data.tokenizer) and CLIP's byte-level BPE (data.clip_bpe)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack(
    ids: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids -> (int32 [N, length] rows with bos/eos/pad, bool [N] whether pieces were cut)."""
    head = [bos_id] if bos_id >= 0 else []
    room = length - len(head) - 1  # eos always survives truncation
    if room < 0:
        raise ValueError(f"text length {length} leaves no room for bos and eos")
    out = np.full((len(ids), length), pad_id, dtype=np.int32)
    truncated = np.zeros((len(ids),), dtype=bool)
    for row, pieces in enumerate(ids):
        truncated[row] = len(pieces) > room
        seq = head + list(pieces[:room]) + [eos_id]
        out[row, : len(seq)] = seq
    return out, truncated
