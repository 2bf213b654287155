#!/usr/bin/env bash
# The test suite on the oldest versions requirements.txt allows, in a fresh virtual environment:
#     bash tools/check_lower_bounds.sh
# (downloads torch 2.4.0 with its CUDA libraries, about 3 GB). CI runs the newest versions.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT  # the environment is ~5 GB: leave nothing behind
venv="$tmp/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet torch==2.4.0 torchvision==0.19.0 tqdm==4.60.0 pytest==7.0.0 \
    matplotlib==3.8.4 timm==1.0.9
"$venv/bin/python" -c "import torch, torchvision, tqdm, pytest, matplotlib, timm; print('torch',
    torch.__version__, 'torchvision', torchvision.__version__, 'tqdm', tqdm.__version__, 'pytest',
    pytest.__version__, 'matplotlib', matplotlib.__version__, 'timm', timm.__version__)"
VITC_SLOW=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider
