#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the lent GPU machine lacks for reflow_core: pydantic, zarr and
# their needs, at the versions of this checkout's .venv, for its Python 3.12 on x86-64. The device tool then
# carries .whl (see benchmarks/gpu_device.sh and docs/performance.md). About 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# what `python -c "import benchmarks.gpu, reflow_core.stages"` imports that the GPU image does not hold
# (its package list: /work/.library/device/KINDS.md); typing-extensions too, as pydantic wants a recent one
pkgs=(pydantic pydantic-core annotated-types typing-inspection typing-extensions zarr numcodecs donfig google-crc32c)
specs=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' \
        "${pkgs[@]}")
plat=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do plat+=(--platform "${p}_x86_64"); done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl $specs
ls .whl && du -sh .whl
