"""Multi-host training: two `vlm-jax train` processes on 127.0.0.1 (CPU, gloo collectives, 2 fake
devices each, mesh data=2 x fsdp=2) against one process with the same 4-device mesh; SIGTERM to
one process stops both at the same step; the resume gives each host its own next batch; a
process that dies stops the other within a bounded time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vlm_jax.data import pipeline
from vlm_jax.train.checkpoint import Checkpointer
from vlm_jax.train.metrics import read_metrics
from vlm_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch", "local.sh")
REFERENCE_STEPS = 14  # The single-process reference runs this far; the two-process run stays below.


def _config(tiny_clip_config):
    config = tiny_clip_config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
        config.train.steps = 1000  # The runs stop early (SIGTERM, --stop_at_step): the lr schedule is this one.
    return config


def _spec(config, path):
    path.write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The persistent compilation cache the subprocesses share: the pytest run's own (tests/conftest.py
    names it), so the later processes (this file's tests run in a row) skip most compiles."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_JAX_")}
    # Two devices per process; the optimisation level the suite compiles at (tests/conftest.py), if any.
    opt = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level")]
    flags = " ".join(["--xla_force_host_platform_device_count=2", *opt])
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if cache:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cache, spec, workdir, logdir, port, process_id, *args):
    log = open(logdir / f"process{process_id}.log", "w")
    cmd = [
        sys.executable, "-m", "vlm_jax.cli", "train", "--config", spec, "--workdir", str(workdir),
        "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(process_id),
        *args,
    ]
    return subprocess.Popen(cmd, env=_env(cache), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _losses(workdir):
    try:
        return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    except ValueError:  # A line being written.
        return []


def _wait_for_steps(procs, workdir, n, timeout=240):
    deadline = time.time() + timeout
    while len(_losses(workdir)) < n:
        assert time.time() < deadline, "the two processes did not train"
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.1)


def _wait(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs]


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class _TwoHosts:
    """What the two hosts read, side by side: host 0's batch then host 1's, as the rows of the
    global batch (host 0 holds the devices of data index 0). Lets one process see the batches of
    the two-process run."""

    def __init__(self, make, config, tokenizer):
        self._parts = [make(config, tokenizer, process_index=i, process_count=2) for i in range(2)]

    def __next__(self):
        batches = [next(p) for p in self._parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {"parts": [p.get_state() for p in self._parts]}

    def stats(self):
        return self._parts[0].stats()

    def close(self):
        for p in self._parts:
            p.close()


def test_two_processes_match_one_agree_on_sigterm_and_resume_per_host(
    tiny_clip_config, tmp_path, monkeypatch, compile_cache
):
    config = _config(tiny_clip_config)
    # The reference: one process, the same 4-device mesh, the two hosts' batches (this also builds
    # the shared tfds cache before two processes read it).
    make = pipeline.train_batches
    with monkeypatch.context() as m:
        m.setattr(pipeline, "train_batches", lambda c, t, **kw: _TwoHosts(make, c, t))
        train(config, str(tmp_path / "one"), stop_at_step=REFERENCE_STEPS, devices=jax.devices()[:4])
    reference = _losses(tmp_path / "one")
    assert len(reference) == REFERENCE_STEPS

    spec, workdir, port = _spec(config, tmp_path / "cfg.py"), tmp_path / "two", _free_port()
    cap = REFERENCE_STEPS - 3
    procs = [_start(compile_cache, spec, workdir, tmp_path, port, i, "--stop_at_step", str(cap)) for i in range(2)]
    try:
        _wait_for_steps(procs, workdir, 2)
        procs[1].send_signal(signal.SIGTERM)  # Only the second host is preempted...
        codes = _wait(procs, 120)
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    # ...and both saved the same step and stopped there.
    step = Checkpointer(str(workdir)).latest_step()
    assert 2 <= step < cap, logs
    for log in logs:
        assert f"step {step} (preempted" in log, log

    # Resume with launch/local.sh: each host gets its own next batch back (with one host's
    # iterator state for both, host 1 would see host 0's examples and the losses would differ).
    resumed = subprocess.run(
        [LAUNCH, "2", "--config", spec, "--workdir", str(workdir), "--stop_at_step", str(step + 2)],
        env=_env(compile_cache, PYTHON=sys.executable, VLM_JAX_LOCAL_DEVICE_COUNT="2"), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
    )
    assert resumed.returncode == 0, resumed.stdout
    assert Checkpointer(str(workdir)).latest_step() == step + 2
    # The checkpoint holds each host's iterator state, and each host got its own back (another
    # host's state would make the iterator warn that the layouts differ).
    with open(workdir / "checkpoints" / str(step + 2) / "data" / "metadata") as f:
        saved = json.load(f)
    assert [s["layout"]["process_index"] for s in saved["per_host"]] == [0, 1]
    assert "data state was saved with" not in resumed.stdout
    losses = _losses(workdir)
    assert len(losses) == step + 2
    np.testing.assert_allclose(losses, reference[: step + 2], rtol=2e-5, atol=2e-5)
    # The data counters host 0 writes are both hosts' (each reads half of every global batch).
    seen = [r["data/examples_seen"] for r in read_metrics(workdir) if "data/examples_seen" in r]
    assert seen[-1] == (step + 2) * config.data.batch_size, seen


# -m slow (the default suite's 6-minute budget): the default multi-host test above covers two
# processes training, SIGTERM and resume; this one covers a crashed peer.
@pytest.mark.slow
def test_a_dead_process_stops_the_other(tiny_clip_config, tmp_path, compile_cache):
    spec, workdir, port = _spec(_config(tiny_clip_config), tmp_path / "cfg.py"), tmp_path / "run", _free_port()
    procs = [_start(compile_cache, spec, workdir, tmp_path, port, i, "--heartbeat_timeout", "5") for i in range(2)]
    try:
        _wait_for_steps(procs, workdir, 1)
        procs[1].kill()
        t0 = time.time()
        try:
            procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the survivor still runs 60 s after its peer died") from None
        took = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / "process0.log").read_text()
    assert procs[0].returncode != 0, log
    # The survivor learns it from the coordination service's heartbeat, or first from a collective
    # whose socket the dead peer closed (the per-step preemption vote, the data-counter gather, the
    # metrics fetch): gloo says "reset" or "closed" depending on where the read was.
    reasons = ("another task died", "unhealthy", "Connection reset by peer", "Connection closed by peer")
    assert any(why in log for why in reasons), log
    assert took < 30, (took, log)


def test_local_sh_stops_everything_when_one_process_fails(tmp_path):
    # A stand-in for python: process 1 fails at once, the others would run for a minute.
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$VLM_JAX_PROCESS_ID" == 1 ]]; then echo "args: $*"; exit 3; fi\n'
        "exec sleep 60\n"
    )
    fake.chmod(0o755)
    t0 = time.time()
    out = subprocess.run(
        [LAUNCH, "3", "--config", "x.py", "--workdir", "w"], env=_env(PYTHON=str(fake), VLM_JAX_PORT="1234"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30,
    )
    assert out.returncode == 3, out.stdout
    assert time.time() - t0 < 10
    assert "args: -m vlm_jax.cli train --config x.py --workdir w" in out.stdout
    assert "process 1" in out.stdout and "killing the others" in out.stdout


def test_options_from_flags_and_environment():
    from vlm_jax.parallel import distributed

    env = {"VLM_JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "VLM_JAX_NUM_PROCESSES": "4", "VLM_JAX_PROCESS_ID": "3",
           "VLM_JAX_HEARTBEAT_TIMEOUT": "30", "VLM_JAX_DISTRIBUTED": "1"}
    options = distributed.Options.from_env(env, process_id=2, heartbeat_timeout=None)
    assert options == distributed.Options(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, heartbeat_timeout=30, mode="on"
    )
    assert options.explicit and not distributed.Options.from_env({}).explicit
    with pytest.raises(distributed.DistributedError, match="integer"):
        distributed.Options.from_env({"VLM_JAX_NUM_PROCESSES": "two"})


def test_a_plain_run_does_not_initialize(monkeypatch):
    from vlm_jax.parallel import distributed

    for key in list(os.environ):
        if key.startswith(("SLURM_", "OMPI_", "VLM_JAX_")):
            monkeypatch.delenv(key)
    assert distributed.detected_cluster() is None
    assert distributed.initialize(distributed.Options()) is False  # Nothing to join: nothing called.
    assert not jax.distributed.is_initialized()
    # SLURM with several tasks is a multi-host run (JAX reads the rest from SLURM); one task is not.
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1",
                 SLURM_LOCALID="0")
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None


def test_each_host_takes_its_own_data_state(monkeypatch):
    from vlm_jax.parallel import hosts

    state = {"iterator": {"next_index": 5}, "layout": {"process_index": 0}}
    assert hosts.data_state_for_checkpoint(state) is state  # One host: the checkpoint format as before.
    assert hosts.own_data_state(state) is state
    saved = {"per_host": [{"host": 0}, {"host": 1}, {"host": 2}], "process_count": 3}
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert hosts.own_data_state(saved) == {"host": 2}
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # Another host count: host 0's state for all.
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert hosts.own_data_state(saved) == {"host": 0}


def _one_then_two(config, tmp_path, monkeypatch, compile_cache):
    """(the final evals of one process on the 4-device mesh reading both hosts' batches, the
    workdir of the same run on two processes, which must both exit 0)."""
    make = pipeline.train_batches
    with monkeypatch.context() as m:
        m.setattr(pipeline, "train_batches", lambda c, t, **kw: _TwoHosts(make, c, t))
        reference = train(config, str(tmp_path / "one"), devices=jax.devices()[:4])["eval"]
    spec, workdir, port = _spec(config, tmp_path / "cfg.py"), tmp_path / "two", _free_port()
    procs = [_start(compile_cache, spec, workdir, tmp_path, port, i) for i in range(2)]
    try:
        codes = _wait(procs, 300)
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    return reference, workdir


@pytest.mark.slow  # a reference run, then two processes train a captioner and decode (about 2 min)
def test_caption_evaluator_on_two_hosts_matches_one(world_cache, tmp_path, monkeypatch, compile_cache):
    """A Show, Attend and Tell run (data=2 x fsdp=2 over two processes) ends with its caption
    evaluator (beam search, grounding, baseline): host 0 writes the same metrics as one process
    with the same mesh and the two hosts' batches."""
    from vlm_jax import config as config_lib

    config = config_lib.load(
        "configs/show_attend_tell.py:tiny_scratch",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"), "tokenizer.path": str(world_cache / "tokenizer.model"),
            "data.batch_size": 16, "model.embed_dim": 32, "model.hidden": 64, "model.attn_dim": 32,
            "model.encoder.stages": ((1, 8), (1, 8), (1, 16)), "train.steps": 150, "optim.warmup_steps": 5,
            "train.log_every": 10,
            "train.eval_every": 0, "train.ckpt_every": 1000, "train.progress": False,
            "train.async_checkpoints": False, "evals.val.num_examples": 16, "evals.val.batch_size": 8,
            "evals.val.max_new_tokens": 12, "evals.val.beam_size": 2,
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=64, validation=32, test=32))
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
    reference, workdir = _one_then_two(config, tmp_path, monkeypatch, compile_cache)
    # Enough steps for captions that are not empty (they do not name objects yet: grounding runs,
    # scoring no words).
    assert reference["val/BLEU-1"] > 0 and "val/grounding/words" in reference, reference
    written = {k: v for r in read_metrics(workdir) for k, v in r.items() if k.startswith("val/")}
    assert set(written) == set(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(written[key], value, rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.slow  # a reference run, then two processes train a small LLaMA and answer (about 2 min)
def test_exact_match_evaluator_on_two_hosts_matches_one(tmp_path, monkeypatch, compile_cache):
    """A LLaMA instruction run on fsdp=2 x tensor=2 over two processes (the vocab-parallel token
    embedding and the decode's KV cache split across hosts) ends with its exact-match evaluator:
    host 0 writes the same metrics as one process with the same mesh and the two hosts' batches."""
    from vlm_jax import config as config_lib
    from vlm_jax.data import text
    from vlm_jax.data.tokenizer import Tokenizer

    Tokenizer.train(text.tokenizer_corpus(0, 300), str(tmp_path / "tok"), 512)
    config = config_lib.load(
        "configs/alpaca.py:tiny",
        {
            "tokenizer.path": str(tmp_path / "tok.model"), "model.width": 32, "model.heads": 4,
            "model.kv_heads": 2, "model.depth": 2, "model.mlp_dim": 64, "data.batch_size": 8,
            "train.steps": 150, "optim.warmup_steps": 5, "optim.lr": 3e-3,
            "train.log_every": 10, "train.ckpt_every": 1000, "train.progress": False,
            "train.async_checkpoints": False, "evals.val.num_examples": 16, "evals.val.batch_size": 8,
            "evals.val.max_new_tokens": 6,
        },
    )
    with config.unlocked():
        del config["stages"]
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
    reference, workdir = _one_then_two(config, tmp_path, monkeypatch, compile_cache)
    assert "val/exact_match" in reference, reference
    np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "one"), rtol=2e-5, atol=2e-5)
    written = {k: v for r in read_metrics(workdir) for k, v in r.items() if k.startswith("val/")}
    assert written == pytest.approx(reference, abs=1e-6)
    # The answers themselves (this short run gets none right, so the metrics alone say little).
    one, two = (json_lines(w / "samples" / "val_step150.jsonl") for w in (tmp_path / "one", workdir))
    assert len(one) == 16 and two == one and any(s["answer"] for s in one), one
