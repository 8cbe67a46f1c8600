#!/usr/bin/env bash
# Pack what the diffusion experiment needs on an offline GPU machine whose image already holds
# Python 3.12, torch and torchmetrics (the lent H200s): cp312 wheels of the rest, pinned to this
# venv's versions (34 MB), and the fp32 Inception weights (87 MB) cut in three parts, so that no
# call's transfer (the repository, 5-6 MB, and what it carries) exceeds 64 MiB: part 1 (26 MB)
# travels with the wheels, parts 2 and 3 with the next two calls to the same machine.
# Writes .offline/{whl,inception-1,inception-2,inception-3} (ignored by git).
#   bash bench/offline_gpu/pack.sh [.venv/bin/python]
set -euo pipefail
PY=${1:-.venv/bin/python}
PACKAGES="flwr flwr-datasets datasets dill multiprocess diffusers importlib-metadata
  pytorch-optimizer cryptography cffi pycparser grpcio grpcio-health-checking protobuf iterators
  pycryptodome tomli tomli-w sqlalchemy greenlet alembic mako prompt-toolkit wcwidth starlette
  fastapi uvicorn pydantic pydantic-core annotated-types typing-inspection"
pins=()
for name in $PACKAGES; do
    pins+=("$name==$("$PY" -m pip show "$name" | sed -n 's/^Version: //p')")
done
rm -rf .offline && mkdir -p .offline/whl
platforms=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
         manylinux_2_31 manylinux_2_34; do
    platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .offline/whl "${pins[@]}"
weights=$("$PY" -c "from diffusion_clients.fid import inception_path; print(inception_path())")
size=$(stat -c %s "$weights")
first=26000000
second=$(( (size - first) / 2 ))
offsets=(0 "$first" $((first + second)) "$size")
for n in 1 2 3; do
    mkdir -p ".offline/inception-$n"
    dd if="$weights" of=".offline/inception-$n/part" bs=1M iflag=skip_bytes,count_bytes \
        skip="${offsets[n - 1]}" count=$((offsets[n] - offsets[n - 1])) status=none
    sha256sum "$weights" | cut -d' ' -f1 > ".offline/inception-$n/sha256"
done
echo "wheels: $(du -sh .offline/whl | cut -f1); Inception sha256: $(sha256sum "$weights" | cut -c1-16)"
