"""Text-only input for language models: plain-text pretraining and Alpaca-style instruction tuning.

    it = train_batches(config, tokenizer)   # config.data.source in SOURCES
    batch = next(it)   # tokens, targets, positions, segment_ids int32 [b, L]; loss_mask f32 [b, L]

Every example becomes (ids, mask): ids = [bos] + pieces (+ [eos]); the model reads ids[:-1] and
predicts ids[1:] where mask[1:] is 1 (instruction tuning: the response tokens only). Rows hold one
example each, padded (segment 0), or, with config.data.packing, as many whole examples as fit,
each its own segment (1, 2, ...) with positions restarting at 0, so attention stays inside an
example and the per-example loss is that of the example alone.

Sources: world_text (documents about the built-in world's scenes), world_instruct (its
instruction set, held-out items in validation/test), alpaca (a JSON list or JSON-lines file of
{instruction, input, output}).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from vlm_jax.data.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("world_text", "world_instruct", "alpaca")
COUNTERS = (
    "data/examples_seen",
    "data/skipped_empty_text",
    "data/skipped_too_long",
    "data/truncated_texts",
    "data/batches",
)
READ_THREADS = 2
_STATE_VERSION = 1

# The Alpaca prompt format (Taori et al. 2023), with and without an input.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt for an instruction (and optional input), ending where the response starts."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


def normalise_answer(text: str) -> str:
    """For exact match: lower case, inner whitespace collapsed, outer spaces and a final '.' gone."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


# ----------------------------------------------------------------------------- sources


class WorldText:
    """Plain-text documents about train scenes of the built-in world (world.lm_document)."""

    def __init__(self, num: int, seed: int = 0):
        self.num, self.seed = int(num), int(seed)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Any]:
        from vlm_jax.data import world

        return {"text": world.lm_document(int(index), seed=self.seed)}


class WorldInstruct:
    """The built-in world's instruction set for one split (world.instruction_example)."""

    def __init__(self, split: str, num: int, seed: int = 0):
        self.split, self.num, self.seed = split, int(num), int(seed)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Any]:
        from vlm_jax.data import world

        return world.instruction_example(int(index), self.split, seed=self.seed)


def read_alpaca(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Alpaca records from a JSON list or a JSON-lines file; clear errors name the bad entry."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        content = f.read()
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    else:
        records = []
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    for n, record in enumerate(records):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise ValueError(f"{path}: record {n} is not an Alpaca record with instruction and output")
    return records


class _Records:
    def __init__(self, records: Sequence[dict[str, Any]]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])


def make_source(config: Any, split: str) -> Any:
    """The text source of config.data.source for a split (len + getitem -> record)."""
    data = config.data
    name = data.source
    sizes = data.get("world_num_examples") or {}
    seed = int(data.get("world_seed", 0))
    if name == "world_text":
        if split != "train":
            raise ValueError("world_text has only a train split (it is pretraining text)")
        return WorldText(int(sizes.get("train", 50000)), seed)
    if name == "world_instruct":
        return WorldInstruct(split, int(sizes.get(split, 2000)), seed)
    if name == "alpaca":
        path = data.path if split == "train" else data.get("eval_path", "")
        if not path:
            raise ValueError(f"alpaca data: set config.data.{'path' if split == 'train' else 'eval_path'}")
        return _Records(read_alpaca(path))
    raise ValueError(f"unknown text source {name!r}; choose one of {SOURCES}")


# ----------------------------------------------------------------------------- encoding


def encode_prompt(tokenizer: Any, record: dict[str, Any]) -> list[int]:
    """[bos] + the Alpaca prompt's pieces: what a model is given to answer an instruction."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    return bos + tokenizer.encode(format_prompt(str(record["instruction"]), str(record.get("input") or "")))


class _Encode:
    """grain map step: record -> {"status", "examples": [(ids int32 [n], mask int8 [n]), ...]}.

    Plain text longer than length + 1 is cut into consecutive windows (each predicts its own
    tokens). An instruction whose prompt leaves no room for a response token is skipped; a
    response that does not fit is cut (counted as truncated).
    """

    def __init__(self, source: Any, tokenizer: Any, length: int, train_on_prompt: bool):
        self.source, self.tokenizer, self.length = source, tokenizer, int(length)
        self.train_on_prompt = bool(train_on_prompt)

    def __call__(self, index: int, source_index: int) -> dict[str, Any]:
        del index
        record = self.source[int(source_index)]
        tok, window = self.tokenizer, self.length + 1
        eos = [tok.eos_id] if tok.eos_id >= 0 else []
        if "text" in record:
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                return {"status": "empty_text"}
            bos = [tok.bos_id] if tok.bos_id >= 0 else []
            ids = bos + tok.encode(text) + eos
            chunks = [ids[i : i + window] for i in range(0, max(len(ids) - 1, 1), window - 1)]
            chunks = [c for c in chunks if len(c) >= 2]
            examples = [(np.asarray(c, np.int32), np.ones(len(c), np.int8)) for c in chunks]
            return {"status": "truncated" if len(chunks) > 1 else "ok", "examples": examples}
        output = record.get("output")
        if not isinstance(output, str) or not output.strip() or not str(record.get("instruction", "")).strip():
            return {"status": "empty_text"}
        prompt = encode_prompt(tok, record)
        response = tok.encode(output.strip()) + eos
        if len(prompt) >= window - 1:
            return {"status": "too_long"}
        status = "truncated" if len(prompt) + len(response) > window else "ok"
        ids = (prompt + response)[:window]
        mask = np.zeros(len(ids), np.int8)
        mask[0 if self.train_on_prompt else len(prompt) :] = 1
        return {"status": status, "examples": [(np.asarray(ids, np.int32), mask)]}


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Examples (ids [n], mask [n], n <= length + 1) packed into one row of `length` inputs.

    Example k is segment k + 1 with positions from 0; padding is segment 0 with no loss.
    """
    row = {
        "tokens": np.full(length, pad_id, np.int32),
        "targets": np.full(length, pad_id, np.int32),
        "loss_mask": np.zeros(length, np.float32),
        "segment_ids": np.zeros(length, np.int32),
        "positions": np.zeros(length, np.int32),
    }
    at = 0
    for k, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        if at + n > length:
            raise ValueError(f"examples need {at + n} positions, more than the row's {length}")
        row["tokens"][at : at + n] = ids[:-1]
        row["targets"][at : at + n] = ids[1:]
        row["loss_mask"][at : at + n] = mask[1:]
        row["segment_ids"][at : at + n] = k + 1
        row["positions"][at : at + n] = np.arange(n)
        at += n
    return row


class TextIterator:
    """Infinite iterator over this host's LM batches, with a JSON-able state for exact resume."""

    def __init__(self, dataset: grain.IterDataset, *, config: Any, batch_size: int, pad_id: int,
                 epoch_length: int, layout: dict[str, Any]):
        self._dataset = dataset
        self._it = iter(dataset)
        self._length = int(config.data.text_length)
        self._packing = bool(config.data.get("packing", False))
        self._batch_size = batch_size
        self._pad_id = pad_id
        self._max_bad = float(config.data.max_bad_fraction)
        self._min_seen = min(200, epoch_length)
        self._epoch_length = epoch_length
        self._layout = layout
        self._counts = dict.fromkeys(COUNTERS, 0)
        # Examples of the last record read that are not yet in a row. A saved state points before
        # that record, with how many of its examples were used, so a resume re-reads it and drops
        # those: exactly the same rows follow, and the counters do not count the record twice.
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._snapshot: dict | None = None
        self._used = 0
        self._record_counts: dict[str, int] = {}
        self._drop = 0

    def __iter__(self) -> TextIterator:
        return self

    def _count(self, key: str, n: int = 1) -> None:
        self._counts[key] += n
        self._record_counts[key] = self._record_counts.get(key, 0) + n

    def _read(self) -> None:
        """Fills the (empty) pending queue with the next usable record's examples."""
        bad_run = 0
        while not self._pending:
            self._snapshot, self._used, self._record_counts = self._it.get_state(), 0, {}
            record = next(self._it)
            self._count("data/examples_seen")
            status = record["status"]
            if status in ("empty_text", "too_long"):
                self._count(f"data/skipped_{status}")
                bad_run += 1
                self._check_bad(bad_run)
                continue
            if status == "truncated":
                self._count("data/truncated_texts")
            self._pending = list(record["examples"])
            if self._drop:  # resuming inside this record
                drop = min(self._drop, len(self._pending))
                del self._pending[:drop]
                self._used, self._drop = drop, self._drop - drop

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        self._used += 1
        return self._pending.pop(0)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self._batch_size:
            if not self._pending:
                self._read()
            if not self._packing:
                rows.append(pack_examples([self._take()], self._length, self._pad_id))
                continue
            row, used = [], 0
            while True:
                if not self._pending:
                    self._read()
                need = len(self._pending[0][0]) - 1
                if used + need > self._length:
                    break
                row.append(self._take())
                used += need
            rows.append(pack_examples(row, self._length, self._pad_id))
        self._check_bad(0)
        self._counts["data/batches"] += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _check_bad(self, bad_run: int) -> None:
        seen = self._counts["data/examples_seen"]
        bad = sum(self._counts[k] for k in COUNTERS if k.startswith("data/skipped_"))
        if bad_run >= self._epoch_length or (seen >= self._min_seen and bad > self._max_bad * seen):
            raise DataError(
                f"{bad} of {seen} text examples were unusable ({bad / max(seen, 1):.1%}), more than "
                f"config.data.max_bad_fraction={self._max_bad}; counts: {self.stats()}"
            )

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the start of the run (restored with the state)."""
        return dict(self._counts)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position + counters; set_state resumes at exactly the next batch."""
        if self._pending:
            reader, used = self._snapshot, self._used
            counts = {k: v - self._record_counts.get(k, 0) for k, v in self._counts.items()}
        else:
            reader, used, counts = self._it.get_state(), 0, dict(self._counts)
        return {"version": _STATE_VERSION, "iterator": reader, "used_of_next_record": used,
                "counts": counts, "layout": dict(self._layout)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from get_state of an identically configured iterator."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"text iterator state version {state.get('version')} is not supported")
        if state.get("layout", {}) != self._layout:
            log.warning("text data state was saved with %s, resuming with %s", state.get("layout"), self._layout)
        self._it.set_state(state["iterator"])
        self._pending, self._drop = [], int(state.get("used_of_next_record", 0))
        self._counts = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNTERS}

    def close(self) -> None:
        """Drops the grain iterator (its reader threads stop)."""
        self._it = self._dataset = None

    def __enter__(self) -> TextIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def train_batches(
    config: Any, tokenizer: Any, *, process_index: int = 0, process_count: int = 1,
    seed: int | None = None, source: Any = None,
) -> TextIterator:
    """This host's infinite stream of batches of config.data.batch_size // process_count rows."""
    batch_size = int(config.data.batch_size)
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by {process_count} hosts")
    seed = int(config.seed if seed is None else seed)
    source = make_source(config, "train") if source is None else source
    per_host = len(source) // process_count
    if per_host == 0:
        raise DataError(f"the training source has {len(source)} examples, fewer than {process_count} hosts")
    ds = grain.MapDataset.range(per_host * process_count)[process_index::process_count]
    if config.data.shuffle:
        ds = ds.seed(seed).shuffle()
    encode = _Encode(source, tokenizer, int(config.data.text_length), config.data.get("train_on_prompt", False))
    ds = ds.repeat().map_with_index(encode)
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=max(64, 2 * batch_size))
    return TextIterator(
        ds.to_iter_dataset(read), config=config, batch_size=batch_size // process_count,
        pad_id=max(tokenizer.pad_id, 0), epoch_length=per_host,
        layout=dict(seed=seed, process_index=process_index, process_count=process_count,
                    batch_size=batch_size, num_examples=len(source),
                    packing=int(bool(config.data.get("packing", False)))),
    )


def instruction_eval_data(config: Any, split: str, num_examples: int | None, tokenizer: Any,
                          *, source: Any = None) -> dict[str, Any]:
    """The first usable instruction items of a split: prompts (id lists), answers, kinds, held_out."""
    source = make_source(config, split) if source is None else source
    want = len(source) if num_examples is None else min(int(num_examples), len(source))
    limit = int(config.data.text_length)
    out: dict[str, list] = {"prompts": [], "answers": [], "kinds": [], "held_out": [], "records": []}
    skipped = 0
    for i in range(len(source)):
        if len(out["prompts"]) >= want:
            break
        record = source[i]
        prompt = encode_prompt(tokenizer, record) if str(record.get("instruction", "")).strip() else []
        if not prompt or len(prompt) >= limit or not str(record.get("output", "")).strip():
            skipped += 1
            continue
        out["prompts"].append(prompt)
        out["answers"].append(str(record["output"]))
        out["kinds"].append(str(record.get("kind", "")))
        out["held_out"].append(bool(record.get("held_out", True)))
        out["records"].append(record)
    if skipped:
        log.info("instruction eval %s: skipped %d unusable items", split, skipped)
    return {**out, "num_skipped": skipped}


def tokenizer_corpus(seed: int = 0, num: int = 3000) -> Iterator[str]:
    """Texts to train a tokenizer for the world's language models: the world's own texts, its
    pretraining documents, and its instruction items in the prompt format."""
    from vlm_jax.data import world

    yield from world.text_corpus(seed=seed, num=num)
    for i in range(num):
        yield world.lm_document(i, seed=seed)
        item = world.instruction_example(i, "train", seed=seed)
        yield format_prompt(item["instruction"], item["input"]) + item["output"]
