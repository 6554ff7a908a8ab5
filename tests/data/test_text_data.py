"""Text input for language models: Alpaca prompts, response-only loss, packing, exact resume."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.data import text, world
from vlm_jax.data.errors import DataError
from vlm_jax.data.pipeline import train_batches
from vlm_jax.data.tokenizer import Tokenizer
from vlm_jax.models import llama
from vlm_jax.tasks import lm


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_tok")
    return Tokenizer.train(text.tokenizer_corpus(0, 400), str(root / "tokenizer"), 512)


def _config(**overrides):
    config = config_lib.load("configs/alpaca.py:tiny", {"data.batch_size": 4, "data.text_length": 96})
    with config.unlocked():
        del config["stages"]
    config_lib.apply_overrides(config, overrides)
    return config


def test_alpaca_template_with_and_without_input():
    with_input = text.format_prompt("add the numbers.", "2 and 3")
    assert "### Instruction:\nadd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    plain = text.format_prompt("what is 2 plus 3?", "  ")
    assert "### Input" not in plain and plain.endswith("### Response:\n")
    assert text.normalise_answer("  The Red  Circle. ") == "the red circle"


def test_instruction_loss_only_on_the_response(tok):
    record = {"instruction": "what is 2 plus 3?", "input": "", "output": "5"}
    (ids, mask), = text._Encode(text._Records([record]), tok, 96, False)(0, 0)["examples"]
    prompt = text.encode_prompt(tok, record)
    assert ids[: len(prompt)].tolist() == prompt and ids[-1] == tok.eos_id
    assert mask[: len(prompt)].sum() == 0 and mask[len(prompt):].all()
    assert tok.decode(ids[len(prompt):]) == "5"
    row = text.pack_examples([(ids, mask)], 96)
    # Targets are the next tokens; the loss counts exactly the response and its eos.
    assert row["targets"][: len(ids) - 1].tolist() == ids[1:].tolist()
    assert row["loss_mask"].sum() == len(ids) - len(prompt)
    (ids2, mask2), = text._Encode(text._Records([record]), tok, 96, True)(0, 0)["examples"]
    assert mask2.all()  # data.train_on_prompt


def test_bad_and_long_items_are_skipped_and_counted(tok):
    records = [{"instruction": "say hi.", "input": "", "output": "hi"}] * 30
    records[3] = {"instruction": "say hi.", "input": "", "output": "   "}
    records[7] = {"instruction": "say hi.", "input": "word " * 200, "output": "hi"}
    config = _config(**{"data.max_bad_fraction": 0.5, "data.shuffle": False})
    it = train_batches(config, tok, source=text._Records(records))
    for _ in range(10):
        next(it)
    stats = it.stats()
    assert stats["data/skipped_empty_text"] >= 1 and stats["data/skipped_too_long"] >= 1
    strict = _config(**{"data.max_bad_fraction": 0.0})
    with pytest.raises(DataError, match="unusable"):
        it = train_batches(strict, tok, source=text._Records(records * 10))
        for _ in range(100):
            next(it)


def test_read_alpaca_json_and_jsonl(tmp_path):
    items = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    assert text.read_alpaca(tmp_path / "d.json") == items == text.read_alpaca(tmp_path / "d.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="record 1"):
        text.read_alpaca(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        text.read_alpaca(tmp_path / "broken.jsonl")


def test_packed_batch_gives_each_example_its_unpacked_loss(tok):
    """Segment ids keep attention inside each example and positions restart: the per-example
    loss of a packed row equals that of the example alone in its own row."""
    encode = text._Encode(text.WorldInstruct("train", 20), tok, 96, False)
    examples = [encode(0, i)["examples"][0] for i in range(6)]
    length = 160
    model = llama.Llama(vocab_size=tok.vocab_size, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=64, max_len=length)
    packed = []
    used = 0
    for ex in examples:  # as many as fit in one row
        if used + len(ex[0]) - 1 > length:
            break
        packed.append(ex)
        used += len(ex[0]) - 1
    assert len(packed) >= 2
    row = text.pack_examples(packed, length)
    single = [text.pack_examples([ex], length) for ex in packed]
    batch = {k: np.stack([row[k]] + [s[k] for s in single]) for k in row}
    inputs = lm.model_inputs(batch)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *inputs))["params"]
    apply = jax.jit(model.apply)  # op by op, each of the model's small ops would compile on its own
    nll = np.asarray(lm.token_nll(apply({"params": params}, *inputs), batch["targets"]))
    mask = batch["loss_mask"]
    for k in range(len(packed)):
        seg = batch["segment_ids"][0] == k + 1
        packed_loss = (nll[0] * mask[0] * seg).sum() / (mask[0] * seg).sum()
        alone = (nll[k + 1] * mask[k + 1]).sum() / mask[k + 1].sum()
        np.testing.assert_allclose(packed_loss, alone, rtol=1e-5, atol=1e-6)
    # Without segment ids the second example would see the first: the check above can fail.
    leaky = np.asarray(lm.token_nll(
        apply({"params": params}, batch["tokens"][:1], batch["positions"][:1], None), batch["targets"][:1]))
    seg2 = batch["segment_ids"][0] == 2
    assert not np.allclose((leaky[0] * mask[0] * seg2).sum(), (nll[0] * mask[0] * seg2).sum(), rtol=1e-4)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_exactly_the_same_batches(tok, packing):
    config = _config(**{"data.packing": packing, "data.source": "world_text", "data.text_length": 48})
    with config.unlocked():
        config.data.world_num_examples.train = 40
    it = train_batches(config, tok)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(4)]
    again = train_batches(config, tok)
    again.set_state(state)
    got = [next(again) for _ in range(4)]
    for a, b in zip(want, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert again.stats() == it.stats()
    # World documents are longer than 48 tokens: they are cut into windows, and packing fills rows.
    assert it.stats()["data/truncated_texts"] > 0
    if packing:
        assert (want[0]["segment_ids"].max(axis=1) >= 1).all()
        assert (want[0]["loss_mask"] > 0).mean() > 0.6  # whole windows only: some rows end early


def test_world_instructions_hold_out_items():
    train_items = [world.instruction_example(i, "train") for i in range(400)]
    val_items = [world.instruction_example(i, "validation") for i in range(400)]
    assert {i["kind"] for i in train_items} == set(world.INSTRUCTION_KINDS)
    assert not any(i["held_out"] for i in train_items)
    held = {(c, s) for c, s in world.HELD_OUT_PAIRS}
    for item in train_items:  # no held-out pair is ever named in training
        words = f"{item['instruction']} {item['input']} {item['output']}"
        assert not any(f"{c} {s}" in words for c, s in held)
    train_sums = {i["instruction"] for i in train_items if i["kind"] == "arithmetic"}
    for item in val_items:
        if item["kind"] == "arithmetic":
            assert item["held_out"] and item["instruction"] not in train_sums
    assert 0.3 < np.mean([i["held_out"] for i in val_items]) < 0.9
    assert world.instruction_example(5, "test") == world.instruction_example(5, "test")
    # The pretraining documents never use the instruction format.
    assert "### Instruction" not in world.lm_document(0)
