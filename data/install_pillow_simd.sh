#!/usr/bin/env bash
# Replace pillow with pillow-simd in the current Python environment.
#
# pillow-simd decodes JPEG no faster than pillow (both use libjpeg-turbo) but resizes several times
# faster with AVX2; the training transform then resizes with pillow instead of torch (see
# data/transforms.py). Measure before and after with `python -m data.bench --root DIR`.
#
#   bash data/install_pillow_simd.sh            # uses `python` on PATH
#   PYTHON=/path/to/venv/bin/python bash data/install_pillow_simd.sh
#
# Needs a C compiler and the libjpeg-turbo and zlib headers (Debian/Ubuntu:
# apt-get install build-essential libjpeg62-turbo-dev zlib1g-dev; RHEL: libjpeg-turbo-devel
# zlib-devel). The build takes about a minute.
#
# Trap: installing or upgrading torchvision (or anything depending on "pillow") afterwards silently
# puts pillow back over it. Run this script last, and rerun it after such upgrades; the check at
# the end prints which one is active.
set -euo pipefail

PYTHON="${PYTHON:-python}"

if ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    echo "error: this CPU does not report AVX2; pillow-simd would gain little here" >&2
    exit 1
fi

"$PYTHON" -m pip uninstall -y pillow pillow-simd
# --no-deps: pillow-simd must not pull pillow back in; build isolation fetches its build tools.
CC="${CC:-cc} -mavx2" "$PYTHON" -m pip install --no-cache-dir --force-reinstall --no-deps pillow-simd

"$PYTHON" - <<'PY'
import importlib.metadata as metadata
import PIL
from PIL import features

simd = metadata.version("pillow-simd")
print(f"PIL {PIL.__version__} from pillow-simd {simd}; libjpeg-turbo: {features.check_feature('libjpeg_turbo')}")
PY
