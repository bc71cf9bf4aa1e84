#!/usr/bin/env bash
# Fetches the wheels of scripts/gpu_wheels.txt for the GPU machine (CPython 3.12, x86_64
# manylinux) into DEST (default .whl, git-ignored). Run here, where PyPI is reachable; the
# device call then names .whl in `carry` (benchmarks/README.md "The device call").
#
#   bash scripts/gpu_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mapfile -t wheels < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/gpu_wheels.txt)
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$dest" "${wheels[@]}"
ls -l "$dest"
