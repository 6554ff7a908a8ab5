"""`vlm-jax sample` for text-to-image runs (sampling.images) and the CLIP judge of evals.generation
on a real checkpoint: a tiny CLIP run (initialised params saved at step 0) whose task is given a
`generate` that draws a fixed scene stands for a text-to-image run, and judges as the CLIP of a
stage beside it; under -m slow the trainer runs a generation evaluator (metrics, JSON lines and the
PNG grid in <workdir>/samples)."""

import importlib
import json
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlm_jax import tasks
from vlm_jax.data import world
from vlm_jax.data.normalise import normalise

SCENE = [{"shape": "circle", "color": "red", "size": "large", "position": "left"}]


def _drawing_task(name):
    """The task module `name` with a generate that draws SCENE for every prompt (and checks what it gets)."""
    real = importlib.import_module(f"vlm_jax.tasks.{name}")

    def generate(model, variables, tokens, rng, config):
        assert tokens.dtype == np.int32 and tokens.shape[1] == config.data.text_length and (tokens[:, 0] == 2).all()
        assert "params" in variables and rng.shape == jax.random.PRNGKey(0).shape
        image = world.render(SCENE, int(config.data.image_size))
        return normalise(np.repeat(image[None], len(tokens), axis=0), config)

    return types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")},
                                 __name__=real.__name__, generate=generate)


def _patch(mp):
    """tasks.get gives contrastive a generate (a CLIP run becomes text-to-image)."""
    real_get = tasks.get
    mp.setattr(tasks, "get", lambda name: _drawing_task(name) if name == "contrastive" else real_get(name))


@pytest.fixture
def drawing(monkeypatch):
    _patch(monkeypatch)


def _config(world_cache, **overrides):
    """configs/clip.py:tiny, much smaller, on the shared small world."""
    from vlm_jax import config as config_lib

    config = config_lib.load("configs/clip.py:tiny", {
        "data.tfds_data_dir": str(world_cache / "tfds"), "tokenizer.path": str(world_cache / "tokenizer.model"),
        "data.batch_size": 8, "model.image.channels": (8, 8, 8, 8), "model.text.depth": 1,
        "model.text.width": 32, "model.text.heads": 2, "model.embed_dim": 16, **overrides,
    })
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
        config.evals = ml_collections.ConfigDict()
    return config


@pytest.fixture(scope="module")
def run(world_cache, tmp_path_factory):
    """A run of stages holding one stage, clip: a tiny CLIP's freshly initialised params saved as a
    checkpoint at step 0 the way the trainer saves them, and its config.json (no training: fast)."""
    import flax.linen as nn

    from vlm_jax import config as config_lib
    from vlm_jax import models
    from vlm_jax.train.checkpoint import Checkpointer

    root = tmp_path_factory.mktemp("t2i")
    workdir = root / "clip"
    config = _config(world_cache)
    model = models.build(config)
    images, tokens = np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 4), np.int32)
    init = jax.jit(lambda r: nn.meta.unbox(model.init({"params": r}, images, tokens))["params"],
                   out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    checkpointer = Checkpointer(str(workdir), async_save=False)
    checkpointer.save(0, {"params": init(jax.random.PRNGKey(0))}, {}, config)
    checkpointer.close()
    (workdir / "config.json").write_text(config_lib.to_json(config))
    (root / "stages.json").write_text(json.dumps({"order": ["clip"]}))
    return root, config


@pytest.mark.slow
def test_trainer_runs_the_evaluator_and_writes_its_grid(world_cache, tmp_path):
    from vlm_jax.train.trainer import train

    config = _config(world_cache, **{"train.steps": 0, "train.progress": False, "train.async_checkpoints": False})
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(gen=dict(
            kinds=("generation",), split="validation", num_examples=8, samples_per_prompt=2, batch_size=8,
            grid_prompts=3)))
    with pytest.MonkeyPatch.context() as mp:
        _patch(mp)
        summary = train(config, str(tmp_path), devices=jax.devices()[:1])
    assert summary["eval"]["gen/gen/real/main_acc"] == 1.0
    # Every prompt gets the same red circle on the left: right only where that is what it asks for.
    assert 0.0 <= summary["eval"]["gen/gen/main_acc"] < 0.5
    with Image.open(tmp_path / "samples" / "gen_step0.png") as im:
        assert im.size[0] >= 2 * 64 and im.size[1] >= 3 * 64  # 3 prompts of 2 samples
    lines = (tmp_path / "samples" / "gen_step0.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["found"][0]["color"] == "red"


def test_cli_sample_draws_a_grid(run, drawing, tmp_path, capsys):
    from vlm_jax import cli

    root, _ = run
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--workdir", str(root), "--prompt", "a large red circle on the left",
                     "-n", "5", "--out", str(out), "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] == 5 * (64 + 4) + 4  # five 32 px images shown at 64 px
    for j in range(5):  # each cell shows the red circle on the left
        cell = pixels[4:68, 4 + j * 68 : 68 + j * 68]
        assert (np.abs(cell.astype(int) - world.PALETTE["red"]).sum(-1) == 0).sum() > 100


def test_cli_sample_refuses_bad_prompts(run, drawing, tmp_path, capsys):
    from vlm_jax import cli

    root, _ = run
    out = tmp_path / "grid.png"
    for prompt, message in (("  ", "empty prompt"),
                            ("a large red circle on the left and a small blue ring at the top and a small "
                             "green square on the right", "text length 20")):
        assert cli.main(["sample", "--workdir", str(root), "--prompt", prompt, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(root), "--prompt", "a ring", "-n", "0"]) == 2
    assert not out.exists()


def test_a_run_without_generate_is_refused(run):
    from vlm_jax.sampling import images

    root, _ = run
    with pytest.raises(ValueError, match="draws no images"):
        images.run_image_sample(str(root / "clip"), "a red circle", num=1)


@pytest.fixture(scope="module")
def judge(run):
    from vlm_jax.evals import clip_judge

    root, _ = run
    return clip_judge.ClipJudge(clip_judge.resolve_clip_workdir(str(root / "clip"), None))


def _validation(n):
    examples = [world.example(i, "validation") for i in range(n)]
    return np.stack([e["image"] for e in examples]), [e["captions"][0] for e in examples]


def test_clip_judge_embeds_images_and_texts(judge):
    from vlm_jax.evals import clip_judge

    images, texts = _validation(5)
    image_embeds, text_embeds = judge.embed_images(images), judge.embed_texts(texts)
    assert image_embeds.shape == text_embeds.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_embeds, axis=1), 1.0, rtol=1e-5)
    scores = clip_judge.clip_score(image_embeds, text_embeds)
    assert ((0.0 <= scores) & (scores <= 100.0)).all()
    with pytest.raises(ValueError, match="text length"):
        judge.embed_texts(["a large red circle on the left and a small blue ring at the top and a small "
                           "green square on the right"])


def test_evaluator_with_the_clip_of_a_stage_on_the_trainers_mesh(run, judge, drawing):
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.evals import generation
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.train.trainer import sharding_context

    root, config = run
    tokenizer = Tokenizer.load(config.tokenizer.path)
    cfg = ml_collections.ConfigDict(dict(kinds=("generation",), split="validation", num_examples=6,
                                         samples_per_prompt=2, clip_workdir="stage:clip", batch_size=8))
    mesh = make_mesh(config.mesh)  # all 8 devices, as the trainer's
    assert mesh.devices.size == 8
    with sharding_context(mesh, config.sharding_rules):
        ev = generation.GenerationEvaluator("val", cfg, config, None, tokenizer, mesh, str(root / "gen"))
        out = ev({}, {})
        images, texts = _validation(5)
        # The judge restored over the 8 devices embeds as the one-device judge does.
        np.testing.assert_allclose(ev.clip.embed_images(images), judge.embed_images(images), atol=1e-5)
        np.testing.assert_allclose(ev.clip.embed_texts(texts), judge.embed_texts(texts), atol=1e-5)
    for key in ("clip_score", "real/clip_score"):
        assert 0.0 <= out[f"val/gen/{key}"] <= 100.0
    assert np.isfinite(out["val/gen/fd_clip"]) and "val/gen/rerank/main_acc" in out
    # Both samples of a prompt are the same drawing: the same CLIP score.
    assert ev.last_scores.shape == (6, 2) and ev.last_scores[:, 0] == pytest.approx(ev.last_scores[:, 1], abs=1e-4)


def test_stage_paths_and_unreadable_images_are_clear(tmp_path):
    from vlm_jax.sampling import images

    assert images.stage_path(tmp_path / "grid.png", 0) == str(tmp_path / "grid_stage0.png")
    assert images.stage_path("out", 2) == "out_stage2.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        images.read_image(str(bad))
