"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per pytest run: the main process names it, and its xdist workers
# (and the processes tests start) inherit the variable. The many small training runs compile the
# same steps; later ones load them instead of compiling again. Removed when the run ends.
_OWN_CACHE = os.path.join(tempfile.gettempdir(), f"vlm_jax_pytest_cache_{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _OWN_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# Random bits by the original (non-partitionable) threefry: on XLA's CPU compiler the partitionable
# one makes every model.init program 2-3x slower to compile (a tiny CLIP's init 3.3 s against 1.3 s,
# as long as its train step) and the default suite about a fifth slower; the values differ, the code
# paths do not. tests/train/test_trainer.py trains one and eight devices with JAX's default (what a
# run uses); `JAX_THREEFRY_PARTITIONABLE=true pytest` runs everything that way.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")

import shutil  # noqa: E402

import pytest  # noqa: E402  (after the XLA flags on purpose)


def pytest_configure(config):
    # The default suite's programs are tiny and compiled once or twice each: compiling is most of
    # its time. LLVM at -O0 compiles them about twice as fast (a 4-layer transformer's train step
    # 1.6 s against 3.3-5.5 s on the 2-core machine) and runs them a little slower; the values are
    # the same IEEE arithmetic. Not for a run that selects the slow tests (long training runs, where
    # the optimised code matters), nor off the CPU. Set here, before any backend starts, so that
    # xdist's workers, which the main process starts after this hook, inherit it.
    expr = config.option.markexpr or ""
    cpu_only = os.environ.get("JAX_PLATFORMS", "") == "cpu"  # not for a run of the GPU / TPU tests
    default_suite = "slow" not in expr or "not slow" in expr
    if cpu_only and default_suite and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0" + _faster_compile_flags()


# XLA's CPU compiler with its older loop emitters instead of the fusion emitters, and its LLVM code
# generated in one piece rather than split across threads: the default suite's CPU time about a
# quarter less (tests/models/test_dalle.py's unit tests 66 s -> 43 s of CPU). Flags XLA does not know
# abort the process, and jaxlib versions differ in what they know: a child process tries them first.
_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def _faster_compile_flags() -> str:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} {_COMPILE_FLAGS}"}
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1)"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f" {_COMPILE_FLAGS}" if probe.returncode == 0 else ""


def pytest_sessionfinish(session):
    # Only the main process, and only the cache it created (not a user's JAX_COMPILATION_CACHE_DIR).
    if not hasattr(session.config, "workerinput") and os.environ["JAX_COMPILATION_CACHE_DIR"] == _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """A small built-in-world dataset and a tokenizer trained on its text, shared by the tests."""
    from vlm_jax.data import world
    from vlm_jax.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("world_cache")
    Tokenizer.train(world.text_corpus(0, 2000), str(root / "tokenizer"), 512)
    return root


@pytest.fixture
def tiny_clip_config(world_cache):
    """configs/clip.py:tiny made smaller still, on the small shared dataset, with no evaluators."""
    import ml_collections

    from vlm_jax import config as config_lib

    config = config_lib.load(
        "configs/clip.py:tiny",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "data.batch_size": 16,
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.image.channels": (8, 16, 16),
            "model.text.depth": 1,
            # Mean pooling: at these widths it learns faster in a few steps than the flatten head.
            "model.image.pool": "mean",
            "model.text.width": 32,
            "model.text.heads": 2,
            "model.embed_dim": 32,
            "optim.warmup_steps": 2,
            "train.steps": 5,
            "train.log_every": 1,
            "train.eval_every": 0,
            "train.ckpt_every": 1000,
            "train.progress": False,
            "train.async_checkpoints": False,
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
        config.evals = ml_collections.ConfigDict()
        # Every test that trains this config as it is compiles the same two programs (init, step)
        # on the same 8-device mesh (data, fsdp and tensor all split), so after the first the
        # persistent compilation cache serves them. Tests that change a key the step depends on
        # (steps, lr, warmup, batch, mesh, model) compile their own.
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    return config


@pytest.fixture
def staged_smoke_config(world_cache):
    """spec, overrides -> a family config whose first stage is the world CLIP, shrunk for a smoke run
    of its stages: 2 steps each on the small shared world, no evaluators, a CLIP of width 16."""
    import ml_collections

    from vlm_jax import config as config_lib

    def make(spec: str, overrides: dict):
        config = config_lib.load(spec, {
            "data.tfds_data_dir": str(world_cache / "tfds"), "tokenizer.path": str(world_cache / "tokenizer.model"),
            "data.batch_size": 8, "train.log_every": 1, "train.progress": False, "train.async_checkpoints": False,
            "train.steps": 2, "train.eval_every": 0, "train.ckpt_every": 1000,
            "stages.clip.train.steps": 2, "stages.clip.train.eval_every": 0, "stages.clip.train.ckpt_every": 1000,
            **overrides,
        })
        with config.unlocked():
            config.data.world_num_examples.update(dict(train=256, validation=64, test=64))
            config.evals = ml_collections.ConfigDict()
            small = lambda **kw: ml_collections.ConfigDict(kw)  # noqa: E731
            config.stages.clip.update(small(
                data=small(batch_size=16), evals=small(val=small(num_examples=16)),
                model=small(embed_dim=16, text=small(width=16, depth=1, heads=2),
                            image=small(channels=(8, 16, 16), pool="mean"))))
        return config

    return make


# How the default run shares its 2 cores (pytest.ini: `-n 2 --dist loadfile --no-loadscope-reorder`):
# each test file is one unit of work for one xdist worker, so its module fixtures and the programs
# its tests compile are made once, not once per worker, and tests that train the same config run in
# a row, the first one's compiles serving the rest from the persistent cache. The longest units go
# first, so that the short ones fill the gaps at the end instead of one long unit running alone
# while the other worker idles. (`--dist loadgroup` would group across files, but pytest 9.2 ignores
# the node ids xdist 3.8 rewrites for it.)
_LONGEST_FIRST = (
    "tests/parallel/test_multihost.py",
    "tests/train/",
    "tests/models/test_gan_int_cls.py",
    "tests/models/test_dalle.py",
    "tests/models/test_text_diffusion.py",
    "tests/models/test_ldm.py",
    "tests/models/test_unclip_decoder.py",
    "tests/kernels/",
    "tests/tasks/test_image_tokenizer.py",
    "tests/sampling/",
    "tests/models/test_captioners.py",
    "tests/layers/test_lora.py",
    "tests/test_sweep.py",
    "tests/plan/",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, p in enumerate(_LONGEST_FIRST) if item.nodeid.startswith(p)), len(_LONGEST_FIRST))

    items.sort(key=rank)
