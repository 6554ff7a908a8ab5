"""The launchers' shell scripts: syntax, and the commands they would run (--dry-run, no cloud)."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sbatch")


def _bash(*args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLM_", "SLURM_"))} | (env or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("script", [TPU_POD, SLURM, os.path.join(REPO, "launch", "local.sh")])
def test_scripts_parse(script):
    if not os.path.exists(script):
        pytest.skip(f"{os.path.basename(script)} is not there")
    result = _bash("-n", script)
    assert result.returncode == 0, result.stderr


def _words(line):
    return shlex.split(line)


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    result = _bash(
        TPU_POD, "--dry-run", "--name", "my-pod", "--zone", "us-central2-b", "--accelerator", "v4-32",
        "--version", "tpu-ubuntu2204-base", "--project", "proj", "--env", "XLA_FLAGS=--a=1 --b",
        "--", "--config", "configs/llama.py:llama2_7b", "--workdir", "/mnt/runs/a b", "--config.mesh.fsdp=-1",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6, result.stdout
    flags = ["--zone=us-central2-b", "--project=proj"]
    # 1. The slice: created only when describe finds none.
    describe, create = lines[0].split(" >/dev/null 2>&1 || ")
    assert _words(describe)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-pod"]
    assert _words(create) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod", *flags,
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
    ]
    # 2. The working tree, packed, copied to every worker, unpacked and installed there.
    assert "git ls-files" in lines[1] and "tar" in lines[1]
    scp = _words(lines[2])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "my-pod:vlm_jax_src.tgz"
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", *flags, "--worker=all"]
    unpack, install, train = (_words(line) for line in lines[3:6])
    assert unpack[:-1] == ssh and "tar -xzf ~/vlm_jax_src.tgz -C ~/vlm_jax" in unpack[-1]
    assert install[:-1] == ssh and "'jax[tpu]'" in install[-1] and "pip install -q -e ~/vlm_jax" in install[-1]
    # 3. The same `vlm-jax train` on every worker, its arguments intact through two shells.
    assert train[:-1] == ssh
    remote = train[-1].removeprefix("--command=")
    assert remote.startswith("cd ~/vlm_jax")
    assert "export 'XLA_FLAGS=--a=1 --b'" in remote
    assert remote.endswith(
        "vlm-jax train --config configs/llama.py:llama2_7b --workdir '/mnt/runs/a b' --config.mesh.fsdp=-1"
    )


def test_tpu_pod_variants_and_errors():
    result = _bash(TPU_POD, "--dry-run", "--name", "p", "--no-create", "--no-sync", "--no-install", "--spot",
                   "--detach", "eval", "--workdir", "w")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert _words(lines[0])[4:6] == ["describe", "p"] and "create" not in lines[0]
    assert "nohup vlm-jax eval --workdir w > ~/vlm_jax_train.log" in lines[1]
    # The name can come from the environment; the command is required.
    result = _bash(TPU_POD, "--dry-run", "--no-sync", "--pip", "vlm_jax==0.1.0", "--", "python", "-m", "x",
                   env={"VLM_TPU_NAME": "env-pod", "VLM_TPU_ZONE": "europe-west4-a"})
    assert result.returncode == 0, result.stderr
    assert "create env-pod --zone=europe-west4-a" in result.stdout
    assert "pip install -q vlm_jax==0.1.0" in result.stdout and result.stdout.rstrip().endswith("python -m x'")
    assert _bash(TPU_POD, "--dry-run", "--", "--config", "c").returncode == 2
    assert _bash(TPU_POD, "--dry-run", "--name", "p").returncode == 2
    assert "--accelerator" in _bash(TPU_POD, "--help").stdout


def test_slurm_dry_run_one_process_per_node_sees_all_gpus():
    env = {"VLM_DRY_RUN": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node1,node2"}
    result = _bash(SLURM, "--config", "configs/clip.py:b16", "--workdir", "/shared/run", env=env)
    assert result.returncode == 0, result.stderr
    srun, task = result.stdout.strip().splitlines()
    words = _words(srun)
    assert words[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert words[-6:] == ["vlm-jax", "train", "--config", "configs/clip.py:b16", "--workdir", "/shared/run"]
    assert task == ("task 0: JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 vlm-jax train --config configs/clip.py:b16 "
                    "--workdir /shared/run")


def test_slurm_dry_run_one_process_per_gpu_with_explicit_coordinator():
    env = {"VLM_DRY_RUN": "1", "VLM_EXPLICIT_COORDINATOR": "1", "SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu7,gpu8", "PATH": "/usr/bin:/bin"}
    result = _bash(SLURM, "--config", "c.py", "--workdir", "w", env=env)
    assert result.returncode == 0, result.stderr
    srun, task = result.stdout.strip().splitlines()
    assert "--ntasks-per-node=8" in _words(srun)
    assert task == ("task 11: JAX_LOCAL_DEVICE_IDS=3 vlm-jax train --config c.py --workdir w "
                    "--coordinator_address gpu7:62674 --num_processes 16 --process_id 11")
    assert _bash(SLURM, env={"VLM_DRY_RUN": "1"}).returncode == 2
