#!/usr/bin/env bash
# Train on a Cloud TPU slice: create the TPU VM (or a queued resource), install this project on every worker,
# run the same `crosswrite train` on all of them (jax.distributed finds its peers itself), stream process 0's log.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE --config FILE --workdir DIR [options] \
#       [--config.KEY=VALUE ...]
#
#   --name NAME           TPU name                                   (env CROSSWRITE_TPU_NAME)
#   --zone ZONE           e.g. us-west4-a                            (env CROSSWRITE_TPU_ZONE)
#   --project PROJECT     Google Cloud project; default: gcloud's    (env CROSSWRITE_TPU_PROJECT)
#   --accelerator TYPE    v5litepod-16, v4-128, v5p-128, v6e-64, ... (env CROSSWRITE_TPU_ACCELERATOR)
#   --version VERSION     TPU VM runtime; default by generation      (env CROSSWRITE_TPU_VERSION)
#   --queued              create through `queued-resources create` (waits for capacity)
#   --num-slices N        N slices of --accelerator joined over the data-center network (Multislice; needs
#                         --queued): nodes NAME-0 .. NAME-(N-1), MEGASCALE_* set on each, and the mesh's
#                         dcn_shape N,1,1 (data parallel across slices) unless --config.mesh.dcn_shape is given
#   --spot                spot capacity (with --queued or without)
#   --config FILE         a config file of this checkout, e.g. configs/t5_base_pod.py
#   --workdir DIR         the run directory on every worker; gs://BUCKET/PATH is mounted with gcsfuse at
#                         /mnt/gcs/BUCKET on every worker, so that all of them write one checkpoint
#   --repo URL --ref REF  where workers get the code (default: this checkout's origin and HEAD commit);
#                         --copy sends this working tree instead (scp), uncommitted changes included
#   --no-create           the TPU exists already;  --no-install: and has this project installed
#   --delete              delete the TPU after training, however training ended
#   --delete-only         delete the TPU and do nothing else
#   --dry-run             print every gcloud command instead of running it (gcloud need not be installed)
# Any --config.KEY=VALUE argument goes to `crosswrite train` unchanged.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name=${CROSSWRITE_TPU_NAME:-} zone=${CROSSWRITE_TPU_ZONE:-} project=${CROSSWRITE_TPU_PROJECT:-}
accelerator=${CROSSWRITE_TPU_ACCELERATOR:-} version=${CROSSWRITE_TPU_VERSION:-}
config="" workdir="" repo="" ref="" copy=0 queued=0 spot=0 create=1 install=1 train=1 delete=0 dry_run=0
num_slices=1
overrides=()
while [ $# -gt 0 ]; do
  case $1 in
    --name|--zone|--project|--accelerator|--version|--config|--workdir|--repo|--ref)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;
    --name=*|--zone=*|--project=*|--accelerator=*|--version=*|--config=*|--workdir=*|--repo=*|--ref=*)
      key=${1%%=*}; declare "${key#--}=${1#*=}"; shift ;;
    --num-slices) [ $# -ge 2 ] || die "$1 needs a value"; num_slices=$2; shift 2 ;;
    --num-slices=*) num_slices=${1#*=}; shift ;;
    --copy) copy=1; shift ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --no-create) create=0; shift ;;
    --no-install) install=0; shift ;;
    --delete) delete=1; shift ;;
    --delete-only) create=0 install=0 train=0 delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --config.*=*) overrides+=("$1"); shift ;;
    --config.*) [ $# -ge 2 ] || die "$1 needs a value"; overrides+=("$1=$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'; see launch/tpu_pod.sh --help" ;;
  esac
done

[ -n "$name" ] || die "--name is required (or set CROSSWRITE_TPU_NAME)"
[ -n "$zone" ] || die "--zone is required (or set CROSSWRITE_TPU_ZONE)"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lowercase letters, digits and '-' only"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num-slices '$num_slices' is not a positive whole number"
if [ "$num_slices" -gt 1 ] && [ "$queued" = 0 ] && [ "$create" = 1 ]; then
  die "--num-slices $num_slices creates a Multislice through queued resources; add --queued"
fi
nodes=("$name")
if [ "$num_slices" -gt 1 ]; then
  nodes=()
  for ((i = 0; i < num_slices; i++)); do nodes+=("$name-$i"); done
  dcn_given=0
  for o in "${overrides[@]}"; do [[ $o == --config.mesh.dcn_shape=* ]] && dcn_given=1; done
  [ "$dcn_given" = 1 ] || overrides+=("--config.mesh.dcn_shape=$num_slices,1,1")
fi
if [ "$create" = 1 ]; then
  [ -n "$accelerator" ] || die "--accelerator is required to create a TPU (e.g. v5litepod-16, v4-128, v5p-128)"
  [[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "--accelerator '$accelerator' is not a TPU type like v5litepod-16"
  if [ -z "$version" ]; then
    case $accelerator in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die "no default --version for '$accelerator'; pass --version" ;;
    esac
  fi
fi
if [ "$train" = 1 ]; then
  [ -n "$config" ] || die "--config is required (e.g. configs/t5_base_pod.py)"
  [ -n "$workdir" ] || die "--workdir is required (gs://BUCKET/PATH, or a path on every worker)"
  [ -f "$config" ] || die "config file '$config' not found (give its path inside this checkout)"
fi

here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$install" = 1 ] && [ "$copy" = 0 ]; then
  repo=${repo:-$(git -C "$here" remote get-url origin 2>/dev/null || true)}
  ref=${ref:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}
  [ -n "$repo" ] || die "this checkout has no 'origin' remote: pass --repo URL, or --copy to send the working tree"
fi

# The run directory as the workers see it; gs:// goes through a gcsfuse mount.
bucket=""
run_dir=$workdir
if [[ $workdir == gs://* ]]; then
  path=${workdir#gs://}
  bucket=${path%%/*}
  [ -n "$bucket" ] || die "--workdir '$workdir' names no bucket"
  run_dir=/mnt/gcs/$path
fi

tpu=(compute tpus tpu-vm)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")

quote() {  # one word as a shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[-A-Za-z0-9_./=:@%+,~]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # prints the command, quoted for copying into a shell; runs it unless --dry-run
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  echo "${words[*]}"
  [ "$dry_run" = 1 ] || "$@"
}

jax_version=$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)
remote_dir='~/crosswrite'

if [ "$create" = 1 ]; then
  capacity=()
  [ "$spot" = 1 ] && capacity+=(--spot)
  if [ "$queued" = 1 ]; then
    node_spec=(--node-id="$name")
    [ "$num_slices" -gt 1 ] && node_spec=(--node-count="$num_slices" --node-prefix="$name")
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" "${node_spec[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${capacity[@]}"
    # A queued resource is ready when its state is ACTIVE.
    poll="until gcloud compute tpus queued-resources describe $(printf '%q' "$name") --zone=$(printf '%q' "$zone")"
    [ -n "$project" ] && poll+=" --project=$(printf '%q' "$project")"
    run bash -c "$poll --format='value(state.state)' | grep -qx ACTIVE; do sleep 30; done"
  else
    run gcloud "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${capacity[@]}"
  fi
fi

if [ "$install" = 1 ]; then
  if [ "$copy" = 1 ]; then
    archive=${TMPDIR:-/tmp}/crosswrite-$name.tar.gz
    run bash -c "cd $(printf '%q' "$here") && git ls-files -co --exclude-standard -z | tar czf $(printf '%q' "$archive") --null -T -"
    for node in "${nodes[@]}"; do
      run gcloud "${tpu[@]}" scp "$archive" "$node":crosswrite.tar.gz "${where[@]}" --worker=all
    done
    fetch="rm -rf $remote_dir && mkdir -p $remote_dir && tar xzf ~/crosswrite.tar.gz -C $remote_dir"
  else
    fetch="(test -d $remote_dir/.git || git clone $(printf '%q' "$repo") $remote_dir)"
    fetch+=" && git -C $remote_dir fetch --quiet origin && git -C $remote_dir checkout --quiet $(printf '%q' "$ref")"
  fi
  setup="set -e; $fetch; cd $remote_dir; python3 -m venv .venv; . .venv/bin/activate"
  setup+="; pip install --quiet --upgrade pip; pip install --quiet -e '.[tfds]' gcsfs 'jax[tpu]==$jax_version'"
  if [ -n "$bucket" ]; then
    setup+="; if ! command -v gcsfuse >/dev/null; then"
    setup+=" echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
    setup+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    setup+=" && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -"
    setup+=" && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
    setup+="; sudo mkdir -p /mnt/gcs/$bucket && sudo chown \$USER /mnt/gcs/$bucket"
    setup+="; mountpoint -q /mnt/gcs/$bucket || gcsfuse --implicit-dirs $bucket /mnt/gcs/$bucket"
  fi
  for node in "${nodes[@]}"; do
    run gcloud "${tpu[@]}" ssh "$node" "${where[@]}" --worker=all --command="$setup"
  done
fi

status=0
if [ "$train" = 1 ]; then
  words=()
  for word in crosswrite train --config "$config" --workdir "$run_dir" "${overrides[@]}"; do
    words+=("$(quote "$word")")
  done
  # Every worker runs the same script in the background; its log and exit status stay on the worker. With several
  # slices, each node's workers learn their slice and the coordinator (worker 0 of slice 0) from MEGASCALE_*.
  megascale=""
  if [ "$num_slices" -gt 1 ]; then
    describe="gcloud compute tpus tpu-vm describe $(printf '%q' "${nodes[0]}") --zone=$(printf '%q' "$zone")"
    [ -n "$project" ] && describe+=" --project=$(printf '%q' "$project")"
    echo "$describe --format='value(networkEndpoints[0].ipAddress)'"
    if [ "$dry_run" = 1 ]; then coordinator=SLICE0_WORKER0_IP; else
      coordinator=$(eval "$describe --format='value(networkEndpoints[0].ipAddress)'"); fi
    [ -n "$coordinator" ] || die "could not read the address of ${nodes[0]}'s worker 0"
  fi
  for i in "${!nodes[@]}"; do
    if [ "$num_slices" -gt 1 ]; then
      megascale="export MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8080 MEGASCALE_NUM_SLICES=$num_slices"
      megascale+=" MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=8080; "
    fi
    script="${megascale}. .venv/bin/activate; ${words[*]}; echo \$? > ~/crosswrite_train.status"
    start="cd $remote_dir && rm -f ~/crosswrite_train.status && printf '%s\n' $(quote "$script") > ~/crosswrite_train.sh"
    start+=" && (nohup bash ~/crosswrite_train.sh > ~/crosswrite_train.log 2>&1 &)"
    run gcloud "${tpu[@]}" ssh "${nodes[$i]}" "${where[@]}" --worker=all --command="$start"
  done
  # Process 0's log, until its command has ended; then its exit status.
  follow="tail -n +1 -F ~/crosswrite_train.log 2>/dev/null & while [ ! -f ~/crosswrite_train.status ]; do sleep 5; done"
  follow+="; sleep 1; kill %1; exit \$(cat ~/crosswrite_train.status)"
  run gcloud "${tpu[@]}" ssh "${nodes[0]}" "${where[@]}" --worker=0 --command="$follow" || status=$?
  [ "$status" = 0 ] || echo "tpu_pod.sh: training ended with status $status; the other workers' logs:" \
    "gcloud compute tpus tpu-vm ssh ${nodes[0]} --zone=$zone --worker=all --command='tail -n 20 ~/crosswrite_train.log'" >&2
fi

if [ "$delete" = 1 ]; then
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
fi
exit "$status"
