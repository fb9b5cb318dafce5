#!/usr/bin/env bash
# The one device command (from the repo root): bash gpu_bundle/run.sh [benchmark arguments]
# Unpacks the carried deps and model into /tmp, puts them on PYTHONPATH with the repo, and runs
# python3 -m benchmarks.gpu_embedding --rows 100000 (later arguments win) -> $OUT/gpu.json, gpu.log.
# Test hooks: PYTHON (default python3), BUNDLE_TMP (default /tmp/reactive-gpu-bundle),
# BUNDLE_NO_DEPS=1 (unpack, but leave the carried deps off PYTHONPATH: a Python that is not 3.12).
# LOG: the log's name under $OUT (default gpu.log).
set -euo pipefail
started=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$root/benchmarks/results}"
work="${BUNDLE_TMP:-/tmp/reactive-gpu-bundle}"
mkdir -p "$OUT"
rm -rf "$work"
mkdir -p "$work"

echo "== unpacking into $work"
"$PY" - "$here" "$work" <<'PY'
import sys, tarfile, threading, time
from pathlib import Path

here, work = Path(sys.argv[1]), Path(sys.argv[2])
errors = []

def unpack(name):
    try:
        started = time.perf_counter()
        dest = work / name
        dest.mkdir()
        with tarfile.open(here / f"{name}.tar.xz") as tar:
            try:
                tar.extractall(dest, filter="data")
            except TypeError:  # a Python without extraction filters
                tar.extractall(dest)
        print(f"   {name}: {time.perf_counter() - started:.1f} s", flush=True)
    except BaseException as exc:
        errors.append(f"{name}: {exc!r}")

threads = [threading.Thread(target=unpack, args=(n,)) for n in ("minilm", "deps", "fallback")]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    sys.exit("unpacking failed: " + "; ".join(errors))
PY

# The fallback holds small pure-Python packages the device is said to have (toolz, requests...):
# keep only the distributions this Python cannot import, so that none shadows the device's own.
"$PY" - "$work/fallback" <<'PY'
import importlib.util, shutil, sys
from pathlib import Path

fallback = Path(sys.argv[1])
kept = []
for info in sorted(fallback.glob("*.dist-info")):
    tops = set()
    for line in (info / "RECORD").read_text().splitlines():
        first = line.split(",")[0].split("/")[0]
        if first and first not in ("..", "bin", "__pycache__") and not first.endswith(".dist-info"):
            tops.add(first)
    modules = {t[:-3] if t.endswith(".py") else t for t in tops if not t.endswith(".so")}
    if modules and all(importlib.util.find_spec(m) is not None for m in modules):
        for top in tops | {info.name}:
            path = fallback / top
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        kept.append(info.name)
print("== fallback packages used:", ", ".join(kept) or "none (python has them all)")
PY

if [ "${BUNDLE_NO_DEPS:-}" = 1 ]; then
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$work/deps:$root${PYTHONPATH:+:$PYTHONPATH}:$work/fallback"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$root"

echo "== preflight ($(( $(date +%s) - started )) s)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv || true
"$PY" - <<'PY'
import sys
import duckdb, fastavro, ibis, numpy, pyarrow, sqlglot, zmq
import reactive
from reactive.backends import backend_for_uri

print(f"   python {sys.version.split()[0]}; duckdb {duckdb.__version__}, ibis {ibis.__version__}, sqlglot {sqlglot.__version__}, "
      f"pyarrow {pyarrow.__version__}, numpy {numpy.__version__}, zmq {zmq.__version__}, fastavro {fastavro.__version__}")
print(f"   reactive from {reactive.__file__}; duckdb:// -> {backend_for_uri('duckdb:///x.duckdb').__name__}")
try:
    import torch, sentence_transformers
    print(f"   torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()}), "
          f"sentence-transformers {sentence_transformers.__version__}")
except ImportError as exc:
    print(f"   no torch / sentence-transformers: {exc}")
PY

echo "== benchmark ($(( $(date +%s) - started )) s)"
set -o pipefail
"$PY" -m benchmarks.gpu_embedding --rows 100000 --model "$work/minilm" --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/${LOG:-gpu.log}"
echo "== done in $(( $(date +%s) - started )) s"
