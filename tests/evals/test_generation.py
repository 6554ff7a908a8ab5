"""The generation evaluator (evals.generation) on hand-made images of known content: a fake
text-to-image task that renders the prompt it is given (all metrics 1.0), one that renders another
colour and shape (0.0), one whose last sample of N is the right one (a fake CLIP must rerank it to
the top); the Fréchet distance against an independent computation (and clean-fid / pytorch-fid
when installed), the prompt parser's round trip over the world's captions, denormalise, grids,
clip_workdir resolution and the errors for bad input."""

import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlm_jax import evals, tasks
from vlm_jax.data import prompts, scorer, world
from vlm_jax.data.normalise import denormalise, normalise
from vlm_jax.evals import clip_judge, frechet, generation
from vlm_jax.sampling import draw

NUM = 24  # prompts: 4 of each phrasing


# --------------------------------------------------------------------------- fakes


def _fill(objects, rng):
    """Parsed prompt objects -> a drawable scene: unnamed sizes (main large, others small),
    positions (free cells) and colour-shape pairs (unused ones) filled in from rng."""
    used = {o["position"] for o in objects if "position" in o}
    pairs = {(o["color"], o["shape"]) for o in objects if "color" in o and "shape" in o}
    scene = []
    for i, obj in enumerate(objects):
        obj = dict(obj)
        obj.setdefault("size", "large" if i == 0 else "small")
        if "position" not in obj:
            obj["position"] = str(rng.choice([p for p in world.POSITIONS if p not in used]))
            used.add(obj["position"])
        if "color" not in obj or "shape" not in obj:
            free = [p for p in world.ALL_PAIRS if p not in pairs]
            obj["color"], obj["shape"] = free[int(rng.integers(len(free)))]
            pairs.add((obj["color"], obj["shape"]))
        scene.append(obj)
    return scene


def _wrong(scene):
    """Another colour and another shape for every object."""
    return [{**o, "color": world.COLORS[(world.COLORS.index(o["color"]) + 1) % len(world.COLORS)],
             "shape": world.SHAPES[(world.SHAPES.index(o["shape"]) + 1) % len(world.SHAPES)]} for o in scene]


def fake_task(tokenizer, samples_per_prompt=1):
    """A task module whose generate renders the decoded prompt with world.render. variables["params"]
    ["mode"]: "right" (the prompt), "wrong" (_wrong of it), or "last_of_n" (right only for the last
    of each prompt's samples_per_prompt rows: batches must hold whole prompts)."""

    def generate(model, variables, tokens, rng, config):
        del model, rng
        mode = variables["params"]["mode"]
        size = int(config.data.image_size)
        out = []
        for row, ids in enumerate(np.asarray(tokens)):
            text = tokenizer.decode(ids)
            scene = _fill(prompts.parse_caption(text), np.random.default_rng(row))
            right = mode == "right" or (mode == "last_of_n" and row % samples_per_prompt == samples_per_prompt - 1)
            out.append(world.render(scene if right else _wrong(scene), size))
        return normalise(np.stack(out), config)

    return types.SimpleNamespace(__name__="fake_t2i", generate=generate, model_inputs=lambda b: (b["image"],))


class FakeClip:
    """Embeds an image as the one-hot colour-shape pair of its largest object (read by the scorer)
    and a text as the pair of its main object: a CLIP that is right about the main object."""

    def _onehot(self, pairs):
        out = np.full((len(pairs), len(world.CLASS_NAMES)), 0.01, np.float32)
        for i, pair in enumerate(pairs):
            if pair is not None:
                out[i, world.label_of(*pair)] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_images(self, images):
        found = [scorer.read_objects(im) for im in images]
        return self._onehot([(f[0]["color"], f[0]["shape"]) if f else None for f in found])

    def embed_texts(self, texts):
        return self._onehot([(o[0]["color"], o[0]["shape"]) for o in map(prompts.parse_caption, texts)])


@pytest.fixture(scope="module")
def setup(world_cache):
    from vlm_jax import config as config_lib
    from vlm_jax.data.tokenizer import Tokenizer

    config = config_lib.load("configs/clip.py:tiny", {
        "data.tfds_data_dir": str(world_cache / "tfds"), "tokenizer.path": str(world_cache / "tokenizer.model"),
    })
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
        config.task.name = "fake_t2i"
    tokenizer = Tokenizer.load(world_cache / "tokenizer.model")
    real_get = tasks.get
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "get", lambda name: fake_task(tokenizer, 4) if name == "fake_t2i" else real_get(name))
        yield config, tokenizer


def _eval_cfg(**kw):
    base = dict(kinds=("generation",), split="validation", num_examples=NUM, samples_per_prompt=1,
                clip_workdir="", batch_size=8, grid_prompts=3)
    return ml_collections.ConfigDict({**base, **kw})


def _build(config, tokenizer, eval_cfg, **kw):
    return generation.GenerationEvaluator("val", eval_cfg, config, None, tokenizer, **kw)


def _run(ev, mode):
    """The evaluator's metrics for the fake task in `mode`, without the evaluator's 'val/' prefix."""
    out = ev({"mode": mode}, {})
    assert all(k.startswith("val/gen/") for k in out)
    return {k[len("val/"):]: v for k, v in out.items()}


# --------------------------------------------------------------------------- the evaluator


def test_rendered_prompts_score_one_and_write_a_grid(setup, tmp_path):
    config, tokenizer = setup
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(val=_eval_cfg(samples_per_prompt=2)))
    (ev,) = evals.build(config, None, tokenizer, mesh=None)  # registered as its own kind
    assert isinstance(ev, generation.GenerationEvaluator)
    assert ev.held_out.any() and not ev.held_out.all()
    assert len({p.split()[0] for p in ev.prompts}) >= 4  # the phrasings take turns
    out = _run(ev, "right")
    for prefix in ("gen/", "gen/real/"):
        for metric in generation.METRICS:
            for suffix in ("", "_heldout", "_seen"):
                assert out[f"{prefix}{metric}{suffix}"] == 1.0, (prefix, metric, suffix)
    # Each prompt judged on the next prompt's image: about chance for the main object.
    assert out["gen/shuffled/main_acc"] <= 0.2 and out["gen/shuffled/all_acc"] <= 0.1
    # No CLIP: no CLIP score, Fréchet distance or reranking.
    assert not [k for k in out if "clip" in k or "rerank" in k]
    path = ev.write_grid(str(tmp_path / "samples"), 7)
    assert path == str(tmp_path / "samples" / "val_step7.png")
    with Image.open(path) as im:  # 3 rows of 2 images, each shown at 64 px with its prompt under it
        assert im.size[0] >= 2 * 64 and im.size[1] >= 3 * (64 + 10)
    items = ev.samples()
    assert len(items) == NUM and items[0]["prompt"] == ev.prompts[0] and items[0]["verdict"]["main_acc"] == 1.0


def test_mismatched_images_score_zero(setup):
    config, tokenizer = setup
    out = _run(_build(config, tokenizer, _eval_cfg()), "wrong")
    assert out["gen/main_acc"] == out["gen/all_acc"] == 0.0
    # A small object may be matched to another one that has its colour or shape.
    assert out["gen/color_acc"] <= 0.1 and out["gen/shape_acc"] <= 0.1
    assert out["gen/real/main_acc"] == out["gen/real/all_acc"] == 1.0
    assert out["gen/shuffled/main_acc"] <= 0.2


def test_clip_reranking_picks_the_right_sample(setup):
    config, tokenizer = setup
    ev = _build(config, tokenizer, _eval_cfg(samples_per_prompt=4, batch_size=8), clip=FakeClip())
    out = _run(ev, "last_of_n")
    assert out["gen/main_acc"] == 0.0  # the first sample is always wrong
    assert out["gen/rerank/main_acc"] == 1.0 and out["gen/rerank/all_acc"] == 1.0
    assert out["gen/rerank/main_acc_heldout"] == 1.0
    assert list(ev.last_choice) == [3] * NUM
    assert 0.0 <= out["gen/clip_score"] < out["gen/real/clip_score"] <= 100.0
    wrong = _run(ev, "wrong")
    right = _run(ev, "right")
    assert right["gen/fd_clip"] < 0.2 * wrong["gen/fd_clip"]
    assert right["gen/clip_score"] == pytest.approx(right["gen/real/clip_score"])
    # The floor: the real images' two halves (even and odd prompts) against each other. The real
    # images themselves score 0 against all of them; mismatched ones far above the floor.
    floor = wrong["gen/real/fd_clip"]
    assert floor == pytest.approx(generation.frechet_distance(ev.real_embeds[0::2], ev.real_embeds[1::2]))
    assert right["gen/fd_clip"] < floor < 0.5 * wrong["gen/fd_clip"]


def test_bad_configs_are_clear_errors(setup):
    config, tokenizer = setup
    with pytest.raises(ValueError, match="has no generate"):
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.task.name = "contrastive"
        _build(cfg, tokenizer, _eval_cfg())
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(val=_eval_cfg(kinds=("generation", "retrieval"))))
    with pytest.raises(ValueError, match="cannot be combined"):
        evals.build(config, None, tokenizer, mesh=None)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        _build(config, tokenizer, _eval_cfg(num_examples=1))
    with pytest.raises(ValueError, match="without its run's workdir"):
        _build(config, tokenizer, _eval_cfg(clip_workdir="stage:clip"))


def test_clip_workdir_resolution(tmp_path):
    run = tmp_path / "run"
    (run / "clip").mkdir(parents=True)
    (run / "gen").mkdir()
    with pytest.raises(FileNotFoundError, match="no run"):
        clip_judge.resolve_clip_workdir("stage:clip", str(run / "gen"))
    (run / "clip" / "config.json").write_text("{}")
    assert clip_judge.resolve_clip_workdir("stage:clip", str(run / "gen")) == str(run / "clip")
    assert clip_judge.resolve_clip_workdir(str(run / "clip"), None) == str(run / "clip")
    with pytest.raises(FileNotFoundError, match="no stage folder"):
        clip_judge.resolve_clip_workdir("stage:other", str(run / "gen"))
    with pytest.raises(ValueError, match="stage:<name>"):
        clip_judge.resolve_clip_workdir("stage:", str(run / "gen"))


def test_judge_counts_and_open_counts():
    scene = [{"shape": "circle", "color": "red", "size": "large", "position": "left"},
             {"shape": "ring", "color": "blue", "size": "small", "position": "top"}]
    image = world.render(scene)
    assert generation.judge(image, prompts.parse_prompt("the large shape is a red circle."))["all_acc"] == 1.0
    only = generation.judge(image, prompts.parse_prompt("a large red circle on the left."))
    assert only["main_acc"] == 1.0 and only["all_acc"] == 0.0  # a second object that was not asked for
    moved = generation.judge(image, prompts.parse_prompt("a red circle on the right and a blue ring."))
    assert moved["main_acc"] == 1.0 and moved["position_acc"] == 0.0 and moved["all_acc"] == 0.0
    assert moved["color_acc"] == moved["shape_acc"] == 1.0 and "size_acc" not in moved
    metrics = generation.summarise([only, moved], np.array([True, False]))
    assert metrics["position_acc"] == 0.5 and metrics["position_acc_heldout"] == 1.0
    assert metrics["position_acc_seen"] == 0.0 and metrics["main_acc_seen"] == 1.0


# --------------------------------------------------------------------------- Fréchet distance


def _fd_by_eigen(a, b):
    """||mu_a - mu_b||^2 + tr Ca + tr Cb - 2 tr sqrt(sqrt(Ca) Cb sqrt(Ca)), by eigendecompositions."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cb @ root_a)
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


@pytest.mark.parametrize("n, m, d", [(200, 150, 16), (64, 80, 8), (300, 300, 32)])
def test_frechet_distance_matches_an_independent_computation(n, m, d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d))
    a = rng.normal(size=(n, d)) @ mix
    b = rng.normal(size=(m, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
    got = generation.frechet_distance(a.astype(np.float32), b.astype(np.float32))
    want = _fd_by_eigen(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(generation.frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


@pytest.mark.parametrize("module, name", [("cleanfid.fid", "frechet_distance"),
                                          ("pytorch_fid.fid_score", "calculate_frechet_distance")])
def test_frechet_distance_matches_the_reference_implementations(module, name):
    reference = getattr(pytest.importorskip(module), name)
    rng = np.random.default_rng(0)
    for n, d in ((500, 64), (100, 16), (40, 64)):  # the last: rank-deficient covariances
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n + 7, d)) * 1.3 + 0.2
        want = reference(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert generation.frechet_distance(a, b) == pytest.approx(float(want), rel=1e-6)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="differ"):
        frechet.frechet_distance(np.ones((5, 4)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        frechet.frechet_distance(np.full((5, 4), np.nan), np.ones((5, 4)))


# --------------------------------------------------------------------------- prompts, pixels, grids


def _named(objects, phrasing):
    """What caption `phrasing` (0-5) of world.captions names of each object."""
    pick = lambda o, keys: {k: o[k] for k in keys}  # noqa: E731
    main, rest = objects[0], objects[1:]
    if phrasing in (0, 1):
        return [pick(o, ("color", "shape")) for o in objects]
    if phrasing == 2:
        return [pick(o, ("size", "color", "shape")) for o in objects]
    if phrasing == 3:
        return [pick(main, ("color", "shape", "position"))] + [pick(o, ("color", "shape")) for o in rest]
    if phrasing == 4 and not rest:
        return [pick(main, ("color", "shape"))]
    if phrasing == 4:
        return [pick(main, ("size", "color", "shape"))] + [{"size": "small"} for _ in rest]
    return [pick(main, ("size", "color", "shape"))]


def test_parse_caption_inverts_every_caption_phrasing():
    for split in ("train", "validation"):
        for index in range(300):
            example = world.example(index, split)
            for phrasing, caption in enumerate(example["captions"]):
                parsed = prompts.parse_prompt(caption)
                assert parsed.objects == _named(example["objects"], phrasing), caption
                assert parsed.exact_count == (phrasing != 5)
            for caption in example["negative_captions"]:
                prompts.parse_caption(caption)


def test_parse_caption_reads_user_prompts_and_rejects_unknown_words():
    assert prompts.parse_caption("A large red circle on the left") == [
        {"size": "large", "color": "red", "shape": "circle", "position": "left"}]
    assert prompts.parse_caption("two blue squares, and a ring in the centre.") == [
        {"color": "blue", "shape": "square"}, {"color": "blue", "shape": "square"},
        {"shape": "ring", "position": "center"}]
    for bad, message in (("", "empty prompt"), ("a purple circle", "unknown word 'purple'"),
                         ("a red circle at the moon", "'at the moon'"), ("a red", "names no shape"),
                         ("the large shape is a small red circle", "cannot be small"),
                         ("a red circle, , a ring", "empty object phrase"), ("a red large red ring", "two colors")):
        with pytest.raises(ValueError, match=message):
            prompts.parse_caption(bad)


def test_denormalise_inverts_normalise(setup):
    config, _ = setup
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    assert np.array_equal(denormalise(normalise(pixels, config), config), pixels)
    assert denormalise(np.full((1, 2, 2, 3), 9.0, np.float32), config).max() == 255  # clipped
    with pytest.raises(ValueError, match="NaN"):
        denormalise(np.full((1, 2, 2, 3), np.nan, np.float32), config)


def test_prompt_tokens_refuse_empty_and_overlong_prompts(setup):
    _, tokenizer = setup
    assert draw.prompt_tokens(tokenizer, ["a red circle."], 20).shape == (1, 20)
    with pytest.raises(draw.PromptError, match="empty prompt"):
        draw.prompt_tokens(tokenizer, ["  "], 20)
    with pytest.raises(draw.PromptError, match="text length 8"):
        draw.prompt_tokens(tokenizer, ["a large red circle on the left and a small blue ring."], 8)


def test_grid_rows_and_labels(tmp_path):
    rows = [np.zeros((3, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)]
    path = draw.write_grid(tmp_path / "g" / "grid.png", rows, ["first row", "second"])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    row = pixels.shape[0] // 2
    assert pixels.shape[1] == 3 * (64 + 4) + 4  # 32 px images shown at 64 px
    assert (pixels[row + 4 : row + 68, 4:68] == 255).all()  # the white image, first in the second row
    assert (pixels[4:68, 4:68] == 0).all() and (pixels[row - 20 : row, 4:80] < 128).any()  # the first label
    with pytest.raises(ValueError, match="one label per row"):
        draw.grid(rows, ["one label"])
