#!/usr/bin/env bash
# Runs `python -m ddpm_jax.main` on all GPUs of this machine: one process, data parallel over every GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu_node.sh [options] [--] MAIN_FLAGS...

Installs this checkout with the CUDA build of JAX (`pip install "jax[cuda12]"`) into a virtual
environment, then runs `python -m ddpm_jax.main MAIN_FLAGS` as one process that uses every GPU of
the machine (set CUDA_VISIBLE_DEVICES to choose some). TensorFlow (used by TFDS and TensorBoard) is
kept off the GPUs by ddpm_jax.main, and the plain `tensorflow` wheel brings no CUDA libraries of
its own: JAX's CUDA 12 wheels are the only CUDA stack installed.

options:
  --venv=DIR      the virtual environment to create/use (default: .venv in the repository)
  --no-install    use the virtual environment as it is (skip pip)
  --dry-run       print every command instead of running it
  -h, --help      this text

XLA settings (environment; yours win where set):
  XLA_FLAGS  gets --xla_gpu_enable_latency_hiding_scheduler=true: XLA schedules the gradient
             all-reduce to overlap the backward pass (matters with several GPUs).
  XLA_PYTHON_CLIENT_MEM_FRACTION  JAX preallocates this fraction of each GPU's memory (JAX's
             default .75); raise to .9 for the 256x256 models, or set
             XLA_PYTHON_CLIENT_PREALLOCATE=false to share a GPU.

example:
  launch/gpu_node.sh --config=configs/cifar10.py --workdir=runs/cifar10 --config.model.dtype=bfloat16
USAGE
}

die() { echo "gpu_node.sh: $*" >&2; echo "run launch/gpu_node.sh --help for usage" >&2; exit 2; }

dry_run=0 install=1 venv=""
main_flags=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --venv=*) venv="${1#*=}" ;;
    --) shift; main_flags+=("$@"); break ;;
    *) main_flags+=("$1") ;;
  esac
  shift
done
((${#main_flags[@]})) || die "missing MAIN_FLAGS (at least --config=... and --workdir=...)"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${venv:-$repo/.venv}"

# One word as the shell would need it typed: as is when plain, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Every command goes through here: printed under --dry-run (one line, copy-pasteable), run otherwise.
run() {
  if ((dry_run)); then
    local word line=""
    for word in "$@"; do line+="${line:+ }$(quote "$word")"; done
    echo "$line"
  else
    "$@"
  fi
}

if ((install)); then
  [[ -x "$venv/bin/python" ]] || run python3 -m venv "$venv"
  run "$venv/bin/python" -m pip install --upgrade "jax[cuda12]" "$repo"
fi

xla_flags="${XLA_FLAGS:-}"
[[ "$xla_flags" == *xla_gpu_enable_latency_hiding_scheduler* ]] ||
  xla_flags="${xla_flags:+$xla_flags }--xla_gpu_enable_latency_hiding_scheduler=true"

# One process on one machine: never start jax.distributed, even inside a SLURM allocation.
flags=("${main_flags[@]}")
[[ " ${flags[*]} " == *" --config.distributed.initialize="* ]] || flags+=(--config.distributed.initialize=off)
run cd "$repo"  # so that --config=configs/<name>.py and relative workdirs mean the repository's
run env XLA_FLAGS="$xla_flags" "$venv/bin/python" -m ddpm_jax.main "${flags[@]}"
