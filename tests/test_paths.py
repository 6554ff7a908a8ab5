"""Run folders are local paths; a URL is a clear error, not a folder named 'gs:'."""

import os

import pytest

from vlm_jax.cli import main
from vlm_jax.paths import local_dir

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "clip.py") + ":tiny"


def test_local_dir_expands_and_refuses_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_dir("~/runs/x") == os.path.join(str(tmp_path), "runs", "x")
    assert local_dir("relative") == os.path.abspath("relative")
    for url in ("gs://bucket/runs/x", "s3://b/x", "file:///tmp/x"):
        with pytest.raises(ValueError, match="is a URL.*Mount the bucket"):
            local_dir(url)


def test_train_refuses_a_gs_workdir_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir 'gs://bucket/run' is a URL"):
        main(["train", "--config", CONFIG, "--workdir", "gs://bucket/run"])
    assert not os.path.exists(tmp_path / "gs:")
