"""The training loop: sharding equivalence, exact resume, preemption, non-finite losses."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from vlm_jax.train.metrics import read_metrics
from vlm_jax.train.trainer import NonFiniteLossError, train


def _losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_one_device_and_eight_sharded_devices_agree(tiny_clip_config, tmp_path):
    one = tiny_clip_config.copy_and_resolve_references()
    with one.unlocked():
        one.mesh.data = 1
    train(one, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = tiny_clip_config.copy_and_resolve_references()
    with eight.unlocked():
        eight.mesh.data, eight.mesh.fsdp, eight.mesh.tensor = 2, 2, 2
    summary = train(eight, str(tmp_path / "eight"))
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    assert a[-1] < a[0]  # It trains.
    assert summary["finished"] and summary["step"] == 5


def test_resume_is_bit_identical(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.train.steps = 20
    train(config, str(tmp_path / "straight"))
    first = train(config, str(tmp_path / "resumed"), stop_at_step=10)
    assert first["step"] == 10 and not first["finished"]
    second = train(config, str(tmp_path / "resumed"))
    assert second["step"] == 20 and second["finished"]
    a, b = _params(tmp_path / "straight", 20), _params(tmp_path / "resumed", 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The resumed run saw the same batches: its losses after the restart equal the straight run's.
    assert _losses(tmp_path / "straight")[10:] == _losses(tmp_path / "resumed")[10:]


def test_checkpoint_of_the_wrong_shape_is_a_clear_error(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.train.steps = 1
    train(config, str(tmp_path / "run"))
    with config.unlocked():
        config.model.embed_dim = 48
        config.train.steps = 2
    with pytest.raises(CheckpointMismatchError, match="does not fit") as err:
        train(config, str(tmp_path / "run"))
    # It names the arrays that differ (and only those: the text tower's shapes did not change).
    assert "params/text_projection/kernel: checkpoint (32, 32) vs model (32, 48)" in str(err.value)
    assert "params/text/token_embedding" not in str(err.value)


def test_non_finite_loss_skips_the_update_and_stops(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.optim.lr = float("inf")  # The first update makes every param non-finite...
        config.optim.warmup_steps = 0
        config.optim.clip_norm = 0.0
        config.train.max_nonfinite_steps = 2
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at steps"):
        train(config, str(tmp_path / "run"))


# The default suite covers SIGTERM through tests/parallel/test_multihost.py (one of two processes
# signalled: both save the same step and exit 0); this one-process variant runs with -m slow.
@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tiny_clip_config, tmp_path):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.train.steps = 100000
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
