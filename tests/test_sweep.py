"""launch/sweep.py and the configs' get_sweep: expansion, names, commands, a real local sweep,
resuming, and summaries with failed runs."""

import csv
import importlib.util
import json
import os
import re
import shlex
import sys

import pytest

from vlm_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("vlm_jax_launch_sweep", os.path.join(REPO, "launch", "sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep  # dataclasses look their module up there
_spec.loader.exec_module(sweep)

SAFE = re.compile(r"^[A-Za-z0-9._,=+-]+$")

CLIP_TINY_NAMES = [
    "lr=0.001,hard_negatives=True",
    "lr=0.001,hard_negatives=False",
    "lr=0.0015,hard_negatives=True",
    "lr=0.0015,hard_negatives=False",
    "lr=0.002,hard_negatives=True",
    "lr=0.002,hard_negatives=False",
]


def test_clip_tiny_expands_to_named_runs_and_commands(capsys):
    points = config_lib.get_sweep("configs/clip.py:tiny")
    runs = sweep.expand("configs/clip.py:tiny", points, "runs/sw", ["train.steps=3"])
    assert [r.name for r in runs] == CLIP_TINY_NAMES
    assert all(SAFE.match(r.name) for r in runs)
    assert runs[2].overrides == {"optim.lr": 1.5e-3, "data.hard_negatives": True}
    assert runs[2].workdir == os.path.join("runs/sw", "lr=0.0015,hard_negatives=True")
    assert runs[2].command == [
        "vlm-jax", "train", "--config", "configs/clip.py:tiny", "--workdir", "runs/sw/lr=0.0015,hard_negatives=True",
        "--config.train.steps=3", "--config.optim.lr=0.0015", "--config.data.hard_negatives=True",
    ]
    # Stable: the same sweep gives the same names.
    again = sweep.expand("configs/clip.py:tiny", config_lib.get_sweep("configs/clip.py:tiny"), "runs/sw")
    assert [r.name for r in again] == CLIP_TINY_NAMES
    # --print (the default) prints one command a run, with the launcher in front when given.
    assert sweep.main(["--config", "configs/clip.py:tiny", "--workdir", "runs/sw", "--config.train.steps=3"]) == 0
    assert capsys.readouterr().out.splitlines() == [shlex.join(r.command) for r in runs]
    assert sweep.main(["--config", "configs/clip.py:tiny", "--print", "--launcher", "launch/local.sh 2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    # A launcher takes the arguments of `vlm-jax train`.
    assert lines[0] == (
        "launch/local.sh 2 --config configs/clip.py:tiny --workdir runs/sweep/clip_tiny/lr=0.001,hard_negatives=True "
        "--config.optim.lr=0.001 --config.data.hard_negatives=True"
    )
    # The commands are what `vlm-jax train` parses back to the run's config.
    rest, overrides = config_lib.split_overrides(runs[2].command[2:])
    config = config_lib.load(rest[1], overrides)
    assert config.optim.lr == 1.5e-3 and config.data.hard_negatives is True and config.train.steps == 3


@pytest.mark.parametrize(
    "spec",
    ["configs/clip.py:tiny", "configs/clip.py:l14", "configs/vit.py:tiny", "configs/vit.py:b16",
     "configs/llama.py:tiny", "configs/llama.py:llama2_70b", "configs/alpaca.py:tiny", "configs/alpaca.py:llama2_7b",
     "configs/clip.py"],
)
def test_every_config_sweep_loads(spec):
    points = config_lib.get_sweep(spec)
    assert len(points) >= 3
    runs = sweep.expand(spec, points, "w")  # Loads every run's config: unknown keys would fail here.
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) and all(SAFE.match(n) for n in names)


def test_names_are_short_safe_and_distinct():
    short = sweep._short_keys(["optim.lr", "stages.instruct.optim.lr", "model.depth"])
    assert short == {"optim.lr": "optim.lr", "stages.instruct.optim.lr": "instruct.optim.lr", "model.depth": "depth"}
    assert sweep.run_name({"data.source": "a/b c", "model.image.channels": (8, 16)}) == (
        "data.source=a_b_c,model.image.channels=_8,_16"
    )
    long = sweep.run_name({"x": "y" * 300})
    assert len(long) <= sweep.MAX_NAME and SAFE.match(long)
    assert long != sweep.run_name({"x": "y" * 299})
    assert sweep.run_name({}) == "base"
    assert sweep.parse_grid(["optim.lr=1e-3,3e-3", "--config.model.depth=2,4"]) == [
        {"optim.lr": "1e-3", "model.depth": "2"}, {"optim.lr": "1e-3", "model.depth": "4"},
        {"optim.lr": "3e-3", "model.depth": "2"}, {"optim.lr": "3e-3", "model.depth": "4"},
    ]
    with pytest.raises(config_lib.ConfigError, match="twice"):
        sweep.expand("configs/clip.py:tiny", [{"optim.lr": 1e-3}, {"optim.lr": 1e-3}], "w")
    # Values that differ but sanitise to the same name still get their own workdirs.
    runs = sweep.expand("configs/clip.py:tiny", [{"data.source": "a/b"}, {"data.source": "a b"}], "w")
    assert runs[0].name != runs[1].name
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optim.lr'"):
        sweep.expand("configs/clip.py:tiny", [{"optim.lrr": 1.0}], "w")
    assert sweep.main(["--config", "configs/clip.py:tiny", "--grid", "optim.lrr=1"]) == 2


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _lines(path):
    with open(path) as f:
        return len(f.readlines())


@pytest.mark.slow  # the default suite's budget; the summary and failure tests below run the sweep in process
def test_local_sweep_runs_resumes_and_summarises(tmp_path, monkeypatch, capsys):
    """Two real runs of a shrunk tiny LLaMA, each `python -m vlm_jax.cli train` in a subprocess."""
    from vlm_jax.data import text
    from vlm_jax.data.tokenizer import Tokenizer

    Tokenizer.train(text.tokenizer_corpus(0, 300), str(tmp_path / "tok"), 512)
    # For the subprocesses: one device, and the second run (same shapes, other seed) reuses the
    # first one's compiled step from the persistent cache.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    workdir = tmp_path / "sweep"
    argv = [
        "--config", "configs/llama.py:tiny", "--workdir", str(workdir), "--run", "--grid", "seed=0,1",
        f"--config.tokenizer.path={tmp_path / 'tok.model'}", "--config.data.source=world_instruct",
        "--config.data.batch_size=8", "--config.model.width=32",
        "--config.model.heads=4", "--config.model.kv_heads=2", "--config.model.depth=2", "--config.model.mlp_dim=64",
        "--config.train.steps=3", "--config.train.log_every=1", "--config.train.progress=False",
        "--config.train.async_checkpoints=False",
    ]
    assert sweep.main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "[1/2] seed=0: finished" in out and "[2/2] seed=1: finished" in out
    rows = _csv(workdir / "summary.csv")
    assert [r["name"] for r in rows] == ["seed=0", "seed=1"]
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert [r["seed"] for r in rows] == ["0", "1"]
    assert all(r["step"] == "3" and 0 < float(r["train/loss"]) < 10 for r in rows)
    assert rows[0]["train/loss"] != rows[1]["train/loss"]  # Two runs, not one twice.
    md = (workdir / "summary.md").read_text()
    assert "| name | status | seed | step | train/loss |" in md and "| seed=1 | finished | 1 | 3 |" in md
    summary = json.loads((workdir / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["finished", "finished"]
    assert summary["runs"][0]["command"].startswith("vlm-jax train --config configs/llama.py:tiny --workdir ")
    for name in ("seed=0", "seed=1"):
        assert json.loads((workdir / name / "sweep_status.json").read_text())["status"] == "finished"
        assert json.loads((workdir / name / "config.json").read_text())["train"]["steps"] == 3
    # Again: nothing is re-run (the metrics are not appended to), the summary is rewritten.
    before = _lines(workdir / "seed=0" / "metrics.jsonl")
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, not run again") == 2
    assert _lines(workdir / "seed=0" / "metrics.jsonl") == before
    assert [r["status"] for r in _csv(workdir / "summary.csv")] == ["finished", "finished"]


def _write_metrics(directory, records, tail=""):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_summary_marks_failed_runs_and_keeps_the_others(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    base = ["--config", "configs/clip.py:tiny", "--workdir", str(workdir), "--grid", "optim.lr=1e-3,2e-3,3e-3",
            "--config.train.steps=4"]
    # lr=1e-3 ran to the end (launched elsewhere: no sweep status file), its log cut mid-line.
    _write_metrics(
        workdir / "lr=1e-3",
        [
            {"step": 2, "train/loss": 3.0, "train/lr": 1e-3, "data/batches": 2},
            {"step": 2, "val/zero_shot_top1": 0.1},
            {"step": 4, "train/loss": 2.5, "train/lr": 5e-4, "data/batches": 4},
            {"step": 4, "val/zero_shot_top1": 0.25, "val/i2t_r1": 0.125},
        ],
        tail='{"step": 5, "train/lo',
    )
    # lr=2e-3 stopped half way; lr=3e-3 never started.
    _write_metrics(workdir / "lr=2e-3", [{"step": 2, "train/loss": 3.1}])
    assert sweep.main(base + ["--summary"]) == 0
    rows = {r["name"]: r for r in _csv(workdir / "summary.csv")}
    assert {n: r["status"] for n, r in rows.items()} == {
        "lr=1e-3": "finished", "lr=2e-3": "incomplete", "lr=3e-3": "pending"
    }
    assert rows["lr=1e-3"]["train/loss"] == "2.5" and rows["lr=1e-3"]["val/zero_shot_top1"] == "0.25"
    assert rows["lr=1e-3"]["val/i2t_r1"] == "0.125" and "data/batches" not in rows["lr=1e-3"]
    assert rows["lr=3e-3"]["train/loss"] == "" and rows["lr=2e-3"]["step"] == "2"
    capsys.readouterr()

    # A launcher that fails: the unfinished runs fail, the finished one is not run again.
    assert sweep.main(base + ["--run", "--launcher", "false"]) == 1
    out = capsys.readouterr().out
    assert "[1/3] lr=1e-3: finished before" in out and "[2/3] lr=2e-3: failed" in out
    rows = {r["name"]: r for r in _csv(workdir / "summary.csv")}
    assert {n: r["status"] for n, r in rows.items()} == {
        "lr=1e-3": "finished", "lr=2e-3": "failed", "lr=3e-3": "failed"
    }
    assert rows["lr=1e-3"]["val/zero_shot_top1"] == "0.25" and rows["lr=2e-3"]["train/loss"] == "3.1"
    md = (workdir / "summary.md").read_text()
    assert "| lr=2e-3 | failed | 2e-3 |" in md and "## Failed runs" in md and "exit status 1" in md
    status = json.loads((workdir / "lr=3e-3" / "sweep_status.json").read_text())
    assert status["status"] == "failed" and status["returncode"] == 1
    assert status["command"].startswith("false --config configs/clip.py:tiny --workdir ")


def test_in_process_failure_is_recorded(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    argv = ["--config", "configs/clip.py:tiny", "--workdir", str(workdir), "--run", "--in-process",
            "--grid", "optim.lr=1e-3", f"--config.tokenizer.path={tmp_path / 'missing.model'}"]
    assert sweep.main(argv) == 1
    [row] = _csv(workdir / "summary.csv")
    assert row["status"] == "failed"
    record = json.loads((workdir / "summary.json").read_text())["runs"][0]
    assert "FileNotFoundError" in record["error"] and "missing.model" in record["error"]
    assert "Traceback" in (workdir / "lr=1e-3" / "train.log").read_text()


@pytest.mark.slow
def test_sweep_through_the_local_multi_process_launcher(tmp_path, monkeypatch, capsys):
    """One run as two `vlm-jax train` processes (launch/local.sh 2, 2 CPU devices each)."""
    from vlm_jax.data import text
    from vlm_jax.data.tokenizer import Tokenizer

    Tokenizer.train(text.tokenizer_corpus(0, 300), str(tmp_path / "tok"), 512)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    workdir = tmp_path / "sweep"
    argv = [
        "--config", "configs/llama.py:tiny", "--workdir", str(workdir), "--run", "--grid", "seed=0",
        "--launcher", f"bash {os.path.join(REPO, 'launch', 'local.sh')} 2",
        f"--config.tokenizer.path={tmp_path / 'tok.model'}", "--config.data.source=world_instruct",
        "--config.data.batch_size=8", "--config.model.width=32", "--config.model.heads=4",
        "--config.model.kv_heads=2", "--config.model.depth=2", "--config.model.mlp_dim=64", "--config.mesh.fsdp=2",
        "--config.train.steps=3", "--config.train.log_every=1", "--config.train.progress=False",
        "--config.train.async_checkpoints=False",
    ]
    assert sweep.main(argv) == 0, capsys.readouterr()
    [row] = _csv(workdir / "summary.csv")
    assert row["status"] == "finished" and row["step"] == "3" and float(row["train/loss"]) > 0
