#!/usr/bin/env bash
# Runs `python3 -m ddpm_jax.main` on every worker of an existing Cloud TPU VM slice (one process per host).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh [options] TPU_NAME [--] MAIN_FLAGS...

Copies this checkout (its committed files, `git archive HEAD`) to every worker of the Cloud TPU VM
slice TPU_NAME, installs it there with the TPU build of JAX (`pip install "jax[tpu]"`), and runs
`python3 -m ddpm_jax.main MAIN_FLAGS --config.distributed.initialize=on` on all workers at once
through `gcloud compute tpus tpu-vm ssh --worker=all`. Every worker must run: JAX starts only when
all hosts of the slice have joined.

options:
  --zone=ZONE       the slice's zone (default: gcloud's configured compute/zone)
  --project=ID      the slice's project (default: gcloud's configured project)
  --python=PATH     the workers' Python, e.g. a virtual environment's bin/python (default: python3)
  --no-install      skip the copy and install steps (the workers already have this version)
  --detach          start the run in the background on every worker (nohup, log in ~/ddpm_jax/ddpm_jax.log)
                    and return; without it the command stays attached and streams every worker's output
  --dry-run         print every command instead of running it
  -h, --help        this text

Workdir and TFDS data dir should be gs:// paths (every worker reads and writes the same bucket):
  launch/tpu_pod.sh --zone=us-central2-b my-v4-32 -- --config=configs/cifar10.py \
    --workdir=gs://BUCKET/runs/cifar10 --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
USAGE
}

die() { echo "tpu_pod.sh: $*" >&2; echo "run launch/tpu_pod.sh --help for usage" >&2; exit 2; }

dry_run=0 install=1 detach=0 tpu="" zone="" project="" python=python3
main_flags=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --detach) detach=1 ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --) shift; main_flags+=("$@"); break ;;
    -*) if [[ -n "$tpu" ]]; then main_flags+=("$1"); else die "unknown option $1"; fi ;;
    *) if [[ -z "$tpu" ]]; then tpu="$1"; else main_flags+=("$1"); fi ;;
  esac
  shift
done
[[ -n "$tpu" ]] || die "missing TPU_NAME"
((${#main_flags[@]})) || die "missing MAIN_FLAGS (at least --config=... and --workdir=...)"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="${TMPDIR:-/tmp}/ddpm_jax_src.tar.gz"

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

gcloud_target=("$tpu" --worker=all)
[[ -n "$zone" ]] && gcloud_target+=(--zone="$zone")
[[ -n "$project" ]] && gcloud_target+=(--project="$project")

if ((install)); then
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    echo "tpu_pod.sh: warning: uncommitted changes in $repo are not copied (git archive HEAD)" >&2
  fi
  run git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:ddpm_jax_src.tar.gz" "${gcloud_target[@]:1}"
  # Files are unpacked over ~/ddpm_jax, never deleted there: a run's local outputs stay.
  run gcloud compute tpus tpu-vm ssh "${gcloud_target[@]}" --command="mkdir -p ~/ddpm_jax && tar -xzf ~/ddpm_jax_src.tar.gz -C ~/ddpm_jax && $python -m pip install --upgrade \"jax[tpu]\" ~/ddpm_jax"
fi

# Every host calls jax.distributed.initialize(); JAX finds the slice's hosts from the TPU metadata.
flags=("${main_flags[@]}")
[[ " ${flags[*]} " == *" --config.distributed.initialize="* ]] || flags+=(--config.distributed.initialize=on)
command="$python -m ddpm_jax.main"
for flag in "${flags[@]}"; do command+=" $(quote "$flag")"; done
if ((detach)); then
  command="nohup $command > ddpm_jax.log 2>&1 < /dev/null &"
fi
run gcloud compute tpus tpu-vm ssh "${gcloud_target[@]}" --command="cd ~/ddpm_jax && $command"
