#!/usr/bin/env bash
# usage: ./run.sh COMMAND [ARGS]   (kdprune's entry point)
#   ./run.sh pipeline [ARGS]  set up (venv + dataset), then run the whole DVC pipeline (dvc repro ARGS)
#   ./run.sh test [ARGS]      set up, then run the test suite (pytest ARGS)
#   ./run.sh setup            only set up: .venv from requirements.txt, the Fashion-MNIST Debian package
#   ./run.sh preset NAME [--queue] [--dry-run] [-- DVC_EXP_RUN_ARGS]
#                             run a preset as a DVC experiment (python -m kdprune.presets run; list: presets/)
#   ./run.sh help             this text (also -h, --help)
set -euo pipefail
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
PY=${PYTHON:-python3}
FMNIST_DIR=${KDPRUNE_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
APT_LOCK_TIMEOUT=${KDPRUNE_APT_LOCK_TIMEOUT:-300}  # seconds to wait while another apt/dpkg process holds its lock
APT_LOCK_POLL=${KDPRUNE_APT_LOCK_POLL:-5}
APT_MANUAL="sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"

# The two waits reach bash arithmetic and sleep: digits only, checked before anything runs (in arithmetic,
# a value such as 'a[$(cmd)]' would run cmd). One line naming the variable, exit 2.
bad_env() { local v=${2:0:80}; printf 'error: %s = %s is invalid: must be %s\n' "$1" "${v@Q}" "$3" >&2; exit 2; }
if [[ ! $APT_LOCK_TIMEOUT =~ ^[0-9]{1,6}$ ]] || ((10#$APT_LOCK_TIMEOUT > 86400)); then
  bad_env KDPRUNE_APT_LOCK_TIMEOUT "$APT_LOCK_TIMEOUT" "a whole number of seconds in [0, 86400] (default 300)"
fi
if [[ ! $APT_LOCK_POLL =~ ^[0-9]{1,4}(\.[0-9]{1,3})?$ ]] || ((10#${APT_LOCK_POLL%%.*} >= 3600)) \
   || [[ $APT_LOCK_POLL =~ ^0*(\.0*)?$ ]]; then
  bad_env KDPRUNE_APT_LOCK_POLL "$APT_LOCK_POLL" "a number of seconds in (0, 3600), e.g. 5 or 0.2 (default 5)"
fi

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }

# apt-get ARGS, quietly; while another apt/dpkg process holds the dpkg or the lists lock, wait for it
# (up to APT_LOCK_TIMEOUT s), then give up with one line naming the lock and the manual command.
apt_get() {
  local deadline=$((SECONDS + APT_LOCK_TIMEOUT)) wait=0 err lock said=
  while :; do
    # the first try fails fast, so the wait is announced; the next ones let apt wait for the lock itself
    if err=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$wait" "$@" 2>&1 >/dev/null); then
      return 0
    fi
    if ! grep -qE 'Could not get lock|Unable to lock|Unable to acquire' <<<"$err"; then
      printf '%s\n' "$err" >&2
      echo "error: apt-get $* failed (above); install the dataset by hand: $APT_MANUAL" >&2
      exit 1
    fi
    lock=$(grep -oE '/[^ ]+' <<<"$err" | head -n1 | sed 's/[.,)]*$//')
    lock=${lock:-the apt/dpkg lock}
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: $lock is still held by another apt/dpkg process after ${APT_LOCK_TIMEOUT} s; once it has finished, run: $APT_MANUAL (or ./run.sh setup)" >&2
      exit 1
    fi
    [ -n "$said" ] || echo "== waiting up to ${APT_LOCK_TIMEOUT} s for $lock (held by another apt/dpkg process)" >&2
    said=1
    sleep "$APT_LOCK_POLL"
    wait=$((deadline - SECONDS > 0 ? deadline - SECONDS : 0))
  done
}

setup_dataset() {
  if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing the Fashion-MNIST Debian package (dataset-fashion-mnist)"
    apt_get update -qq
    apt_get install -y -qq dataset-fashion-mnist
  else
    echo "warning: Fashion-MNIST not found in $FMNIST_DIR." >&2
    echo "  Install it with: $APT_MANUAL" >&2
    echo "  (or set data.root in params.yaml; with internet, torchvision downloads it)" >&2
  fi
}

setup_venv() {
  local stamp=.venv/.requirements.sha256 want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return; fi
  echo "== creating .venv and installing requirements.txt (about 2 minutes, 6.3 GB)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # pip's notes about the machine's extra local indexes are noise; keep its errors
  .venv/bin/pip install -q -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")"
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case "$cmd" in
    setup) setup_dataset; setup_venv ;;
    pipeline) setup_dataset; setup_venv; export PATH="$PWD/.venv/bin:$PATH"; exec dvc repro "$@" ;;
    # without arguments: every test but the eight marked slow (multi-clone scale-out, the two-worker sweep, the
    # concurrent-experiment refusal, a custom model's --temp run, the INT8 benchmark's resnet18: ~30 min more on 2 cores), so CI stays within its 30 minutes; `./run.sh test -m slow` runs those, `./run.sh test -m ""` all
    test) setup_dataset; setup_venv; export PATH="$PWD/.venv/bin:$PATH"
          if [ $# -eq 0 ]; then set -- -m "not slow"; fi
          exec python -m pytest "$@" ;;
    preset) setup_venv; export PATH="$PWD/.venv/bin:$PATH"; exec python -m kdprune.presets run "$@" ;;
    help | -h | --help) usage ;;
    "") usage >&2; exit 2 ;;
    *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
  esac
}

# sourced (the tests call its functions): define them only
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
