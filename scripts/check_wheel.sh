#!/usr/bin/env bash
# A built wheel samples on its own: build it, install it into a fresh virtual environment (reusing the
# installed torch through --system-site-packages, offline), and run `farmer sample` outside the source tree,
# where only the packaged model (farmer/checkpoints/mnist) can be found.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip wheel --no-deps --no-build-isolation --wheel-dir "$work/dist" "$repo" >/dev/null
# Ask unzip for the one member (exit 11 when absent): piping the listing into `grep -q` fails at random under
# pipefail, since grep exits at the first match and unzip then dies of SIGPIPE.
unzip -l "$work"/dist/farmer_flow-*.whl 'farmer/checkpoints/mnist/model.safetensors' >/dev/null \
  || { echo "the wheel lacks the shipped model" >&2; exit 1; }
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install --no-deps --no-index --force-reinstall "$work"/dist/farmer_flow-*.whl >/dev/null
cd "$work"
"$work/venv/bin/farmer" sample --n 10 --classes 0-9 --out x.png
"$work/venv/bin/python" -c "import farmer, PIL.Image as I; assert 'site-packages' in farmer.__file__; print(I.open('x.png').size)"
