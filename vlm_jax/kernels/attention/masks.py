"""DALL-E's static attention masks (Ramesh et al. 2021, appendix B.1, figure 11) and their tiles.

The sequence is [text_len text tokens; grid * grid image tokens in raster order], seq_len =
text_len + grid**2 (the 12B model: 256 + 32 * 32 = 1280). Write a query position q and a key
position k (0 <= k, q < seq_len); an image token at position p >= text_len has raster index
r = p - text_len, row r // grid and column r % grid. Every kind is causal (k <= q) and:

* text query (q < text_len): sees the keys k <= q, all of them text (plain causal text);
* image query, text key: always seen (every image token sees every text token);
* image query, image key (k <= q, raster indices rq >= rk), by kind:
  - "causal": always (the dense causal mask over the whole sequence: the mask kinds below are
    subsets of it, and a kernel given "causal" runs exactly the plain causal=True schedule);
  - "row": rq - rk <= grid: the key is the token itself or one of the `grid` image tokens before
    it in raster order, i.e. the rest of its own row plus the tail of the row above (figure 11a;
    the Sparse Transformer's strided "local" head with stride grid; lucidrains' DALLE-pytorch
    "axial_row" is the aligned-row variant, which we do not use);
  - "column": (rq - rk) % grid == 0: the same column, rows above and the token itself (figure 11b;
    the Sparse Transformer's strided head); figure 11c draws the same mask over a transposed image
    layout, which is a different token order and not a kind here;
  - "conv": |row(q) - row(k)| <= conv_kernel // 2 and |col(q) - col(k)| <= conv_kernel // 2 (the
    11x11 neighbourhood centred on the query, rows wrapped never), restricted by causality to the
    tokens before it in raster order (figure 11d; the last layer of the 12B model).

`DalleMask.allowed(q, k)` is that predicate on integer arrays (numpy or jnp; the kernels call it on
the positions of a partial tile), extended to kernel padding: a key at k >= seq_len is never seen,
and a padded query row at q >= seq_len sees key 0 only, so that every row a kernel computes has a
key. `block_map` classifies (block_q x block_k) tiles as EMPTY (skipped: no loads, no compute),
PARTIAL (the predicate is applied) or FULL (computed without a mask); `kv_schedule` /
`tpu_tables` turn a map into the tables the Pallas kernels read.

`python -m vlm_jax.bench.dalle_masks` prints the skipped-tile table of the 12B layout at the
kernels' default tiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

KINDS = ("row", "column", "conv", "causal")
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DalleMask:
    """A static (hashable) DALL-E mask over [text_len text; grid x grid image] tokens (module doc).

    Attributes:
      kind: "row", "column", "conv" or "causal".
      text_len: text tokens before the image (>= 0).
      grid: the image is grid x grid tokens (>= 1).
      conv_kernel: odd side of the "conv" neighbourhood (11 in the paper); ignored by other kinds.
    """

    kind: str
    text_len: int
    grid: int
    conv_kernel: int = 11

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown DALL-E mask kind {self.kind!r}; choose one of {KINDS}")
        if int(self.text_len) < 0 or int(self.grid) < 1:
            raise ValueError(f"text_len must be >= 0 and grid >= 1, got {self.text_len}, {self.grid}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd number, got {self.conv_kernel}")

    @property
    def seq_len(self) -> int:
        """text_len + grid**2: the only kv length this mask accepts."""
        return self.text_len + self.grid * self.grid

    def length_error(self, q_len: int, kv_len: int) -> str | None:
        """Why (q_len, kv_len) does not fit this mask, or None. kv_len must be seq_len and the
        queries are the last q_len <= kv_len positions (decode with a cache, as causal=True)."""
        if kv_len != self.seq_len:
            return (
                f"DALL-E {self.kind} mask wants kv_len = text_len + grid**2 = {self.text_len} + "
                f"{self.grid}**2 = {self.seq_len}, got {kv_len}"
            )
        if not 1 <= q_len <= kv_len:
            return f"DALL-E mask wants 1 <= q_len <= kv_len = {kv_len}, got q_len {q_len}"
        return None

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ValueError when `length_error` gives a reason."""
        why = self.length_error(q_len, kv_len)
        if why is not None:
            raise ValueError(why)

    def allowed(self, q: Any, k: Any) -> Any:
        """Boolean (q position, k position) -> may attend, broadcasting; pure arithmetic.

        q, k: integer numpy arrays (-> numpy) or jax arrays (-> jax, usable inside Pallas kernels).
        Positions past seq_len are kernel padding: keys there are never seen, padded query rows see
        key 0 only.
        """
        xp = np if isinstance(q, np.ndarray) and isinstance(k, np.ndarray) else jnp
        n, t, g = self.seq_len, self.text_len, self.grid
        ok = (k <= q) & (k < n)
        if self.kind != "causal":
            rq, rk = xp.maximum(q - t, 0), xp.maximum(k - t, 0)  # raster indices (0 for text)
            if self.kind == "row":
                image = rq - rk <= g
            elif self.kind == "column":
                image = _rem(rq - rk, g, xp) == 0
            else:
                half = self.conv_kernel // 2
                near_rows = _div(rq, g, xp) - _div(rk, g, xp) <= half
                image = near_rows & (xp.abs(_rem(rq, g, xp) - _rem(rk, g, xp)) <= half)
            ok = ok & ((k < t) | image)
        return xp.where(q >= n, k == 0, ok)

    def dense(self, q_len: int | None = None, kv_len: int | None = None) -> np.ndarray:
        """The mask as numpy bool [q_len, kv_len] (default seq_len each); queries are the last
        q_len positions. Raises ValueError for lengths that do not fit (`length_error`)."""
        kv_len = self.seq_len if kv_len is None else kv_len
        q_len = kv_len if q_len is None else q_len
        self.check_lengths(q_len, kv_len)
        q = np.arange(q_len)[:, None] + (kv_len - q_len)
        return self.allowed(q, np.arange(kv_len)[None, :])

    def block_map(
        self, block_q: int, block_k: int, q_len: int | None = None, kv_len: int | None = None,
        q_tiles: int | None = None, k_tiles: int | None = None,
    ) -> np.ndarray:
        """int8 [q_tiles, k_tiles]: EMPTY, PARTIAL or FULL per (block_q x block_k) tile.

        Lengths default to seq_len, tile counts to ceil(length / block) (a kernel that pads further
        passes more). Rows and keys past the lengths are the kernels' padding (see `allowed`): a tile
        with padded keys is never FULL, a tile of padded rows only sees key 0.
        """
        kv_len = self.seq_len if kv_len is None else kv_len
        q_len = kv_len if q_len is None else q_len
        self.check_lengths(q_len, kv_len)
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
        nq = math.ceil(q_len / block_q) if q_tiles is None else q_tiles
        nk = math.ceil(kv_len / block_k) if k_tiles is None else k_tiles
        q = np.arange(nq * block_q)[:, None] + (kv_len - q_len)
        tiles = self.allowed(q, np.arange(nk * block_k)[None, :]).reshape(nq, block_q, nk, block_k)
        seen = tiles.sum(axis=(1, 3))
        out = np.full((nq, nk), PARTIAL, np.int8)
        out[seen == 0] = EMPTY
        out[seen == block_q * block_k] = FULL
        return out

    def skipped_fraction(self, block_q: int, block_k: int) -> dict[str, float]:
        """Tile counts at seq_len and the fractions skipped (EMPTY tiles).

        Returns {"tiles", "empty", "partial", "full": counts; "vs_dense": empty / tiles, the
        fraction skipped against a schedule that visits every tile; "vs_causal": the fraction of
        the tiles that plain causal visits which this mask skips on top}.
        """
        bmap = self.block_map(block_q, block_k)
        causal = dataclasses.replace(self, kind="causal").block_map(block_q, block_k)
        visited_causal = int((causal != EMPTY).sum())
        empty = int((bmap == EMPTY).sum())
        causal_empty = int((causal == EMPTY).sum())
        return {
            "tiles": bmap.size,
            "empty": empty,
            "partial": int((bmap == PARTIAL).sum()),
            "full": int((bmap == FULL).sum()),
            "vs_dense": empty / bmap.size,
            "vs_causal": (empty - causal_empty) / visited_causal,
        }


def _div(x: Any, n: int, xp: Any) -> Any:
    """x // n for 0 <= x < 2**22. On jax arrays in float32, floor((x + 0.5) / n), exact in that
    range: no integer vector division, which Mosaic and Triton handle poorly or not at all."""
    if xp is np:
        return x // n
    return jnp.floor((x.astype(jnp.float32) + 0.5) * (1.0 / n)).astype(jnp.int32)


def _rem(x: Any, n: int, xp: Any) -> Any:
    """x % n for 0 <= x < 2**22."""
    return x % n if xp is np else x - _div(x, n, xp) * n


def kv_schedule(bmap: np.ndarray, all_masked: bool, width: int | None = None) -> np.ndarray:
    """The tiles each row of a block map visits, as int32 [rows, width]: column 0 the count of
    FULL tiles (visited without a mask), column 1 the count of non-EMPTY tiles, then their column
    indices, FULL ones first, then PARTIAL, then zeros. all_masked: count every tile as PARTIAL
    (segment ids need the mask everywhere). width: default rows' need, rounded up to a power of
    two (Triton blocks); pass the transpose of a map for the dk/dv kernels' q-tile lists."""
    rows, cols = bmap.shape
    width = width or 1 << (cols + 1).bit_length()
    out = np.zeros((rows, width), np.int32)
    for r in range(rows):
        full = [] if all_masked else np.flatnonzero(bmap[r] == FULL).tolist()
        part = np.flatnonzero((bmap[r] == PARTIAL) | ((bmap[r] == FULL) & all_masked)).tolist()
        out[r, 0], out[r, 1] = len(full), len(full) + len(part)
        out[r, 2 : 2 + len(full) + len(part)] = full + part
    return out


def tpu_tables(bmap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat int32 tables for a TPU grid that walks every (q block i, kv block j) tile:

    (kind [nq * nk]: EMPTY / PARTIAL / FULL of tile (i, j) at i * nk + j;
     kv_fetch [nq * nk]: the kv block the forward / dq index maps load at step (i, j): j itself when
     the tile is visited, else the last visited block of row i before j (or the row's first visited
     one), so that a skipped step re-uses the block in VMEM and issues no DMA;
     q_fetch [nk * nq]: the same for the dk/dv grid, which walks q blocks i for each kv block j).
    """
    nq, nk = bmap.shape

    def fetch(rows: np.ndarray) -> np.ndarray:
        out = np.zeros(rows.shape, np.int32)
        for r, row in enumerate(rows):
            visited = np.flatnonzero(row != EMPTY)
            last = visited[0] if visited.size else 0
            for c in range(row.size):
                last = c if row[c] != EMPTY else last
                out[r, c] = last
        return out.reshape(-1)

    return bmap.astype(np.int32).reshape(-1), fetch(bmap), fetch(bmap.T)


def skipped_table(text_len: int, grid: int, blocks: dict[str, tuple[int, int]]) -> str:
    """A text table of `skipped_fraction` per kind (rows) and named (block_q, block_k) tiling, for
    the layout [text_len text; grid x grid image]."""
    lines = [
        f"DALL-E layout: {text_len} text + {grid}x{grid} image = {text_len + grid * grid} tokens",
        f"{'kind':<8}{'tiles':<12}{'block q x k':>12}{'tiles':>7}{'empty':>7}{'partial':>8}{'full':>6}"
        f"{'skip/dense':>12}{'skip/causal':>13}",
    ]
    for kind in KINDS:
        for name, (bq, bk) in blocks.items():
            s = DalleMask(kind, text_len, grid).skipped_fraction(bq, bk)
            lines.append(
                f"{kind:<8}{name:<12}{f'{bq} x {bk}':>12}{s['tiles']:>7}{s['empty']:>7}{s['partial']:>8}"
                f"{s['full']:>6}{s['vs_dense']:>12.1%}{s['vs_causal']:>13.1%}"
            )
    return "\n".join(lines)
