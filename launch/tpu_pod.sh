#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or a multi-host pod slice) with gcloud.
#
#   launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b --accelerator v4-32 -- \
#       --config configs/llama.py:llama2_7b --workdir /mnt/shared/runs/llama2_7b --config.mesh.fsdp=-1
#
# 1. Uses the slice NAME, or creates it (gcloud compute tpus tpu-vm create) when it does not exist.
# 2. Copies this working tree (tracked and untracked, not ignored files) to ~/vlm_jax on every
#    worker and pip-installs it there with jax[tpu] (--pip SPEC installs SPEC instead; --no-install
#    only copies; --no-sync copies nothing).
# 3. Runs the same command on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all),
#    from ~/vlm_jax. Every worker is one JAX process: `vlm-jax train` finds the other workers of
#    the slice by itself (jax.distributed.initialize() detects Cloud TPU pods).
#
# The command after the options (or after --) is `vlm-jax train ARGS` when it starts with an
# option (--config ...), `vlm-jax CMD ARGS` when it starts with a vlm-jax subcommand (train, eval,
# sample, data, convert), and is run as given otherwise (e.g. `vlm-jax train ...`, `python -m ...`).
# The workdir must be one place that all workers see (e.g. a GCS bucket mounted with gcsfuse, or
# an NFS share): checkpoints are written by all of them together, metrics by worker 0.
#
# Options (environment defaults in brackets):
#   --name NAME            the TPU VM [VLM_TPU_NAME]; required
#   --zone ZONE            [VLM_TPU_ZONE, else us-central2-b]
#   --project PROJECT      [VLM_TPU_PROJECT, else gcloud's default project]
#   --accelerator TYPE     accelerator type for create, e.g. v4-8, v4-32, v5litepod-16, v5p-64
#                          [VLM_TPU_ACCELERATOR, else v4-8]
#   --version VERSION      TPU VM runtime for create [VLM_TPU_VERSION, else tpu-ubuntu2204-base]
#   --spot                 create it as a Spot VM (preemptible: the run resumes when re-launched)
#   --no-create            fail instead of creating a slice that does not exist
#   --no-sync              do not copy the working tree (it is already on the workers)
#   --no-install           copy, but install nothing
#   --pip SPEC             pip install SPEC on every worker instead of the copied tree
#   --jax SPEC             the JAX to install [VLM_TPU_JAX, else "jax[tpu]"]
#   --env KEY=VALUE        set in the command's environment on every worker (repeatable)
#   --detach               start the command in the background on every worker (log:
#                          ~/vlm_jax_train.log on each) and return; default: stream and wait
#   --delete-after         delete the slice when the command has ended (not with --detach)
#   --dry-run              print the commands (gcloud ..., one a line) instead of running them
#   -h, --help             this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

NAME="${VLM_TPU_NAME:-}"
ZONE="${VLM_TPU_ZONE:-us-central2-b}"
PROJECT="${VLM_TPU_PROJECT:-}"
ACCELERATOR="${VLM_TPU_ACCELERATOR:-v4-8}"
VERSION="${VLM_TPU_VERSION:-tpu-ubuntu2204-base}"
JAX_SPEC="${VLM_TPU_JAX:-jax[tpu]}"
SPOT=0 CREATE=1 SYNC=1 INSTALL=1 PIP_SPEC="" DETACH=0 DELETE_AFTER=0 DRY_RUN=0
ENVS=()
REMOTE_DIR='~/vlm_jax'

need() { [[ $# -ge 2 && -n "$2" ]] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator|--accelerator-type) need "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --no-create) CREATE=0; shift ;;
    --no-sync) SYNC=0; shift ;;
    --no-install) INSTALL=0; shift ;;
    --pip) need "$@"; PIP_SPEC="$2"; shift 2 ;;
    --jax) need "$@"; JAX_SPEC="$2"; shift 2 ;;
    --env) need "$@"; [[ "$2" == *=* ]] || { echo "tpu_pod.sh: --env wants KEY=VALUE" >&2; exit 2; }
           ENVS+=("$2"); shift 2 ;;
    --detach) DETACH=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # The command starts here.
  esac
done

[[ -n "$NAME" ]] || { echo "tpu_pod.sh: --name (or VLM_TPU_NAME) is required; --help for usage" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command to run (e.g. -- --config configs/clip.py:tiny --workdir ...)" >&2; exit 2; }
if [[ $DETACH == 1 && $DELETE_AFTER == 1 ]]; then
  echo "tpu_pod.sh: --delete-after would delete the slice under a detached run" >&2; exit 2
fi

# The command run on every worker.
case "$1" in
  -*) CMD=(vlm-jax train "$@") ;;
  train|eval|sample|data|convert) CMD=(vlm-jax "$@") ;;
  *) CMD=("$@") ;;
esac

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# Shell words, single-quoted where needed ('--flag=value' as --flag='value').
quoted() {
  local out=() a key
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      key=""
      if [[ "$a" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then key="${BASH_REMATCH[1]}"; a="${BASH_REMATCH[2]}"; fi
      out+=("$key'${a//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  echo "${out[*]}"
}

# Prints (--dry-run) or runs a command; a single string is run by bash (for || and pipes).
run() {
  if [[ $DRY_RUN == 1 ]]; then
    if [[ $# -eq 1 ]]; then echo "$1"; else quoted "$@"; fi
  elif [[ $# -eq 1 ]]; then
    bash -c "$1"
  else
    "$@"
  fi
}

# 1. The slice.
CREATE_CMD=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
[[ $SPOT == 1 ]] && CREATE_CMD+=(--spot)
DESCRIBE_CMD=("${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format="value(state)")
if [[ $CREATE == 1 ]]; then
  # Create only when describe fails (no such slice).
  run "$(quoted "${DESCRIBE_CMD[@]}") >/dev/null 2>&1 || $(quoted "${CREATE_CMD[@]}")"
else
  run "${DESCRIBE_CMD[@]}"
fi

SSH=("${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all)

# 2. The code on every worker.
if [[ $SYNC == 1 ]]; then
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/vlm_jax_src_${NAME}.tgz"
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    PACK="cd $(quoted "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quoted "$TARBALL")"
  else
    PACK="tar -C $(quoted "$REPO") --exclude=.git --exclude=runs --exclude='*.egg-info' --exclude=__pycache__ -czf $(quoted "$TARBALL") ."
  fi
  run "$PACK"
  run "${TPU[@]}" scp "$TARBALL" "$NAME:vlm_jax_src.tgz" "${GCLOUD_FLAGS[@]}" --worker=all
  run "${SSH[@]}" --command="mkdir -p $REMOTE_DIR && tar -xzf ~/vlm_jax_src.tgz -C $REMOTE_DIR"
fi
if [[ $INSTALL == 1 ]]; then
  if [[ -n "$PIP_SPEC" ]]; then
    WHAT=$(quoted "$PIP_SPEC")
  else
    WHAT="-e $REMOTE_DIR"
  fi
  run "${SSH[@]}" --command="python3 -m pip install -q -U pip && python3 -m pip install -q -U $(quoted "$JAX_SPEC") && python3 -m pip install -q $WHAT"
fi

# 3. The same command on every worker, from ~/vlm_jax (config paths relative to the repository).
REMOTE="cd $REMOTE_DIR 2>/dev/null || true; export PATH=\"\$HOME/.local/bin:\$PATH\""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  REMOTE+="; export $(quoted "$kv")"
done
if [[ $DETACH == 1 ]]; then
  REMOTE+="; nohup $(quoted "${CMD[@]}") > ~/vlm_jax_train.log 2>&1 < /dev/null &"
else
  REMOTE+="; $(quoted "${CMD[@]}")"
fi
status=0
run "${SSH[@]}" --command="$REMOTE" || status=$?

if [[ $DELETE_AFTER == 1 ]]; then
  run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi
if [[ $DETACH == 1 && $DRY_RUN == 0 ]]; then
  echo "started on every worker of $NAME; follow worker 0 with:"
  echo "  $(quoted "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=0) --command='tail -f ~/vlm_jax_train.log'"
fi
exit $status
