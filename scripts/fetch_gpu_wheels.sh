#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (scripts/gpu_wheels.txt) for CPython 3.12 on manylinux
# x86_64 into .whl/ (git-ignored), on a machine that reaches the package registry. The GPU machine
# has no network: scripts/gpu_check.sh installs them there with pip --no-index --target.
#
#   scripts/fetch_gpu_wheels.sh            # then pass carry=[".whl"] to the device run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
done
grep -v '^#' scripts/gpu_wheels.txt | grep . | while read -r req; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$req"
done
# One version of each package: two would stop the whole install on the GPU machine.
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "more than one wheel of: $dups (remove the stale ones from .whl/)" >&2
    exit 1
fi
du -ch .whl/*.whl | tail -1
ls -l .whl/
