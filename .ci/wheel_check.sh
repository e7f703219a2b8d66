#!/usr/bin/env bash
# The package as a user installs it, against the oldest torch reachable without a download:
#   1. an sdist, checked to hold every tracked source, header and test;
#   2. a wheel built from that unpacked sdist (pip wheel --no-build-isolation --no-deps), so a
#      source the sdist misses fails the build;
#   3. the wheel installed in a fresh venv, and the test suite run from a copy of tests/ and
#      benchmarks/ outside the source tree, so that the installed package is what the tests import
#      (conftest asserts it: MTL_KERNELS_EXPECT_INSTALLED=1) and a file missing from the wheel shows.
# Torch: the 2.13.0 CPU wheel on this machine's disk (/opt/wheels) where it is there, the second
# torch version CI covers; where it is missing, this says so and checks the wheel with the torch
# of the calling python instead (a venv over its site-packages; the C++ ops only, to save time).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d /tmp/mtl_wheel_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
pyver=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
floor_wheel=$(ls /opt/wheels/torch-2.13.0*-"$pyver"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$floor_wheel" ]; then
  echo "wheel check: torch from $floor_wheel, in a fresh venv"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q "$floor_wheel" ninja numpy pytest scikit-learn setuptools wheel
else
  echo "wheel check: SKIPPED the torch 2.13.0 leg: no torch-2.13.0*-$pyver wheel under /opt/wheels;" \
       "checking the wheel with this machine's torch instead"
  python3 -m venv --system-site-packages "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q setuptools wheel
  export MTL_KERNELS_FORCE_CPU=1
fi
PY=$WORK/venv/bin/python
"$PY" -c "import torch; print('wheel check: torch', torch.__version__)"

# 1. the sdist, and every tracked file the build or the tests need inside it
"$PY" setup.py -q sdist -d "$WORK/dist" >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
sdist=$(ls "$WORK"/dist/mtl_kernels-*.tar.gz)
tar -xzf "$sdist" -C "$WORK"
src=$(ls -d "$WORK"/mtl_kernels-*/)
missing=0
while IFS= read -r f; do
  [ -e "$src/$f" ] || { echo "wheel check: the sdist lacks $f"; missing=1; }
done < <(git -C "$REPO" ls-files csrc mtl_kernels tests benchmarks setup.py pyproject.toml README.md)
[ "$missing" = 0 ] || exit 1
echo "wheel check: $(basename "$sdist") holds every tracked source, header and test"

# 2. the wheel, from the unpacked sdist
(cd "$src" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$WORK/wheels")
wheel=$(ls "$WORK"/wheels/mtl_kernels-*.whl)
echo "wheel check: built $(basename "$wheel")"

# 3. installed, and the tests from outside the source tree
"$PY" -m pip install -q --no-deps "$wheel"
mkdir "$WORK/tree"
cp -r "$REPO/tests" "$REPO/benchmarks" "$WORK/tree/"
cd "$WORK/tree"
MTL_KERNELS_EXPECT_INSTALLED=1 "$PY" -m pytest tests -q -p no:cacheprovider
