#!/usr/bin/env bash
# kdprune entry point.
#   ./run.sh pipeline   set up (venv + dataset) and run the whole DVC pipeline (dvc repro)
#   ./run.sh test       set up and run the test suite
#   ./run.sh setup      only set up: .venv from requirements.txt, the Fashion-MNIST Debian package
#   ./run.sh preset NAME  run a preset as a DVC experiment (python -m kdprune.presets run NAME; list: presets/)
# Extra arguments go to dvc repro / pytest.
set -euo pipefail
cd "$(dirname "$0")"
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
PY=${PYTHON:-python3}

setup_dataset() {
  if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing the Fashion-MNIST Debian package (dataset-fashion-mnist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist." >&2
    echo "  Install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" >&2
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

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup_dataset; setup_venv ;;
  pipeline) setup_dataset; setup_venv; export PATH="$PWD/.venv/bin:$PATH"; exec dvc repro "$@" ;;
  test) setup_dataset; setup_venv; export PATH="$PWD/.venv/bin:$PATH"; exec python -m pytest "$@" ;;
  preset) setup_venv; export PATH="$PWD/.venv/bin:$PATH"; exec python -m kdprune.presets run "$@" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
