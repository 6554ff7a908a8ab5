"""The training loop: sharding equivalence, exact resume, preemption, non-finite losses, and the
command line that runs it (train, eval, data preview)."""

import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax import config as config_lib
from vlm_jax.cli import main
from vlm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from vlm_jax.train.metrics import read_metrics
from vlm_jax.train.trainer import NonFiniteLossError, train


def _losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


# -m slow (the default suite's budget): sharded and unsharded runs are also compared by the
# multi-host test (two processes against one) and every param's sharding by the golden snapshots.
@pytest.mark.slow
def test_one_device_and_eight_sharded_devices_agree(tiny_clip_config, tmp_path):
    # With JAX's default random bits, as a run makes them (tests/conftest.py turns them off for
    # compile time): sharded over eight devices, the partitionable threefry gives the same init.
    one = tiny_clip_config.copy_and_resolve_references()
    with one.unlocked():
        one.mesh.data, one.mesh.fsdp, one.mesh.tensor = 1, 1, 1
    eight = tiny_clip_config  # data=2 x fsdp=2 x tensor=2
    assert dict(eight.mesh) == dict(data=2, fsdp=2, tensor=2)
    with jax.threefry_partitionable(True):
        train(one, str(tmp_path / "one"), devices=jax.devices()[:1])
        summary = train(eight, str(tmp_path / "eight"))
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert a[-1] < a[0]  # It trains.
    assert summary["finished"] and summary["step"] == 5


def test_resume_is_bit_identical(tiny_clip_config, tmp_path):
    config = tiny_clip_config  # 5 steps, sharded over data, fsdp and tensor
    train(config, str(tmp_path / "straight"))
    first = train(config, str(tmp_path / "resumed"), stop_at_step=2)
    assert first["step"] == 2 and not first["finished"]
    second = train(config, str(tmp_path / "resumed"))
    assert second["step"] == 5 and second["finished"]
    a, b = _params(tmp_path / "straight", 5), _params(tmp_path / "resumed", 5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The resumed run saw the same batches: its losses after the restart equal the straight run's.
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 5 and straight[2:] == resumed[2:]


def test_checkpoint_of_the_wrong_shape_is_a_clear_error(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    train(config, str(tmp_path / "run"), stop_at_step=1)
    with config.unlocked():
        config.model.embed_dim = 48
    with pytest.raises(CheckpointMismatchError, match="does not fit") as err:
        train(config, str(tmp_path / "run"))
    # It names the arrays that differ (and only those: the text tower's shapes did not change).
    assert "params/text_projection/kernel: checkpoint (32, 32) vs model (32, 48)" in str(err.value)
    assert "params/text/token_embedding" not in str(err.value)


class _PoisonedFrom:
    """The training batches, with NaN images from batch `first` on (numbered from 1)."""

    def __init__(self, batches, first):
        self._batches, self._first, self._n = batches, first, 0

    def __next__(self):
        batch, self._n = dict(next(self._batches)), self._n + 1
        if self._n >= self._first:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def __getattr__(self, name):  # get_state, stats, close
        return getattr(self._batches, name)


def test_non_finite_loss_skips_the_update_and_stops(tiny_clip_config, tmp_path, monkeypatch):
    from vlm_jax.data import pipeline

    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.train.max_nonfinite_steps = 2
    # Step 1 trains; from step 2 on the gradient is NaN. (Poisoned data rather than an infinite
    # learning rate: the step is the one the other tests compile, so the compilation cache serves it.)
    make = pipeline.train_batches
    monkeypatch.setattr(pipeline, "train_batches", lambda *a, **kw: _PoisonedFrom(make(*a, **kw), 2))
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at steps 2..3"):
        train(config, str(tmp_path / "run"))
    assert np.isfinite(_losses(tmp_path / "run")[0])


def test_cli_train_then_eval_then_preview(tiny_clip_config, tmp_path, capsys):
    """Also the smoke test of test_end_to_end.py's test_tiny_clip_learns_and_reports_evals (-m slow):
    the tiny CLIP's train step (this file's other tests compile it: it runs after them, in the same
    xdist worker, from the compilation cache), then its zero-shot and retrieval evaluators."""
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(
            dict(val=dict(kinds=("zero_shot", "retrieval"), split="validation", num_examples=32))
        )
    spec = tmp_path / "cfg.py"
    spec.write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    workdir = str(tmp_path / "run")
    # An override that leaves the compiled step as it is (the seed is an input of the step).
    assert main(["train", "--config", str(spec), "--workdir", workdir, "--config.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "val/zero_shot_top1" in out and "val/i2t_r1" in out and "checkpoints:" in out
    saved = config_lib.from_json((tmp_path / "run" / "config.json").read_text())
    assert saved.seed == 3 and saved.train.steps == 5
    assert main(["eval", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "step 5" in out and "val/t2i_r5" in out
    png = tmp_path / "preview.png"
    assert main(["data", "preview", "--config", str(spec), "--out", str(png), "--num", "4"]) == 0
    assert png.exists() and png.stat().st_size > 1000
    assert main(["train", "--config", str(spec), "--workdir", workdir, "--config.optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


# The default suite covers SIGTERM through tests/parallel/test_multihost.py (one of two processes
# signalled: both save the same step and exit 0); this one-process variant runs with -m slow.
@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.train.steps = 100000
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # its one device
    spec = tmp_path / "cfg.py"
    spec.write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm_jax.cli", "train", "--config", str(spec), "--workdir", str(workdir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(workdir)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted" in out
    step = Checkpointer(str(workdir)).latest_step()
    assert step is not None and step >= 3


@pytest.mark.parametrize("name", ["show_tell", "show_attend_tell"])
def test_stage_with_its_own_config_shares_data_and_maps_params(name, tmp_path):
    """A stage naming another config (the captioners' CLIP encoder stage) takes that config's model
    and task, the base config's data/tokenizer/mesh/seed, and the next stage maps params by name."""
    from vlm_jax import config as config_lib
    from vlm_jax.train import stages
    from vlm_jax.train.trainer import init_from_map

    config = config_lib.load(f"configs/{name}.py:tiny", {"data.tfds_data_dir": "/somewhere", "seed": 7})
    enc = stages.stage_config(config, "encoder", None)
    assert (enc.model.name, enc.task.name, enc.train.steps) == ("clip", "contrastive", 600)
    assert enc.data.tfds_data_dir == "/somewhere" and enc.seed == 7 and "stages" not in enc
    # The image tower the captioner loads has the captioner's encoder shape.
    assert tuple(enc.model.image.channels) == tuple(config.model.encoder.channels)
    assert enc.model.embed_dim == config.model.encoder.output_dim
    cap = stages.stage_config(config, "caption", "/runs/x/encoder")
    assert cap.model.name == name and cap.train.init_from == "/runs/x/encoder"
    assert cap.tokenizer.path == "/runs/x/encoder/tokenizer.model"
    # After a stage that reads no text (and writes no tokenizer), the last one that has it.
    later = stages.stage_config(config, "caption", "/runs/x/images", "/runs/x/encoder")
    assert later.train.init_from == "/runs/x/images" and later.tokenizer.path == "/runs/x/encoder/tokenizer.model"
    assert init_from_map(cap) == {"encoder": "image"}
    # The last stage that has started stands for the run (order from the config or stages.json).
    assert stages.last_stage_dir(str(tmp_path), config) is None
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    assert stages.last_stage_dir(str(tmp_path), config) == str(tmp_path / "encoder")
    assert stages.last_stage_dir(str(tmp_path)) is None  # no config, no stages.json
    (tmp_path / "caption").mkdir()
    (tmp_path / "caption" / "config.json").write_text("{}")
    (tmp_path / "stages.json").write_text('{"order": ["encoder", "caption"]}')
    assert stages.last_stage_dir(str(tmp_path)) == str(tmp_path / "caption")
    with config.unlocked():
        config.train.init_from_map = "encoder"
    with pytest.raises(ValueError, match="ours:theirs"):
        init_from_map(config)


def test_init_also_entries_and_stage_references():
    import ml_collections

    from vlm_jax import config as config_lib
    from vlm_jax.train import stages, trainer

    def parsed(*entries):
        return trainer.init_also(ml_collections.ConfigDict(dict(train=dict(init_also=entries))))

    assert parsed("/runs/clip=clip_text:text, clip_projection:text_projection") == [
        ("/runs/clip", {"clip_text": "text", "clip_projection": "text_projection"})]
    with pytest.raises(ValueError, match="SOURCE=ours:theirs"):
        parsed("/runs/clip")
    with pytest.raises(ValueError, match="only a run of stages"):
        parsed("stage:clip=clip_text:text")
    # In a run of stages, 'stage:<name>' is that earlier stage's folder; a later or unknown one is an error.
    assert stages._resolve_stage_refs(("stage:clip=a:b", "/x=c:d"), "/run", ["clip"]) == ("/run/clip=a:b", "/x=c:d")
    with pytest.raises(config_lib.ConfigError, match="not an earlier stage"):
        stages._resolve_stage_refs(("stage:tokenizer=a:b",), "/run", ["clip"])
