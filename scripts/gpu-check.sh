#!/usr/bin/env bash
# keras-tandem on a GPU, on JAX and on PyTorch: one command, under 5 minutes.
#
# For a bare machine with an NVIDIA GPU, Python 3, JAX and PyTorch (CUDA
# builds), and NO TensorFlow and no internet. Keras, keras-tandem and the few
# packages such a machine may lack travel as wheels in .whl/, made beforehand
# on a machine with pip and a registry:
#
#   scripts/gpu-check.sh prepare [PYTHON_VERSION]   # here: wheels into .whl/ (default 3.12)
#   scripts/gpu-check.sh                            # there: install .whl/, run, report
#
# There, for each backend (KERAS_BACKEND=jax, then torch) it runs:
#   tandem bench predict     64 and 256 client threads, with the hand-off ceiling
#                            (throughput_vs_handoff is the Predictor at 256 threads
#                            against it); GPU_CHECK_NAIVE=1 adds model.predict and
#                            model(x) in every thread (a child process, a minute more)
#   tandem bench train-serve 64 client threads: training speed alone, beside a paced
#                            open-loop load and beside a closed loop as fast as it goes
# and prints each run's output, then a summary. Results go to $OUT when it is
# set (else /tmp/gpu-check-results): predict-BACKEND.json, train-serve-BACKEND.json,
# gpu-check.log, summary.txt.
#
# GPU_CHECK_BACKENDS="jax" (or "torch") runs one backend only.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
PY="${PYTHON:-python3}"

prepare() {
    # Wheels for the GPU machine, pinned to the versions installed here (those
    # the tests ran with): keras-tandem itself, Keras and what Keras and the
    # server need that a JAX/PyTorch image may lack.
    local pyver="${1:-3.12}"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # Built from a copy, so that setuptools leaves no build/ in the checkout.
    local tree
    tree=$(mktemp -d)
    cp -r "$ROOT/src" "$ROOT/pyproject.toml" "$ROOT/README.md" "$tree/"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$tree" || exit 1
    rm -rf "$tree"
    local pins
    pins=$("$PY" - <<'EOF'
from importlib import metadata
print(" ".join(f"{d}=={metadata.version(d)}" for d in ("keras", "namex", "optree", "orjson")))
EOF
) || exit 1
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $pins \
        || exit 1
    if [ -d "$ROOT/.git" ] && ! grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null; then
        echo '/.whl/' >> "$ROOT/.git/info/exclude"   # wheels are never committed
    fi
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

if [ "${1:-}" = "prepare" ]; then
    shift
    prepare "$@"
    exit
fi

OUT_DIR="${OUT:-${TMPDIR:-/tmp}/gpu-check-results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

SITE=/tmp/tandem-site
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || { say "installing $WHEELS failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    # No wheels: keras-tandem from this checkout (Keras must be installed).
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# JAX otherwise takes 75% of the GPU's memory at start; nothing here needs that.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The naive baselines (model.predict / model(x) in every thread, in a child
# process) can hang or crash; they are left out unless GPU_CHECK_NAIVE=1.
NAIVE=--skip-naive
[ "${GPU_CHECK_NAIVE:-0}" = 1 ] && NAIVE=

say "== gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | tee -a "$LOG"
"$PY" - 2>&1 <<'EOF' | tee -a "$LOG"
import importlib.util, platform
from importlib import metadata
for d in ("keras", "keras-tandem", "jax", "jaxlib", "torch", "numpy", "tensorflow"):
    try:
        v = metadata.version(d)
    except metadata.PackageNotFoundError:
        v = "not installed"
    print(f"  {d:<13} {v}")
print(f"  python        {platform.python_version()}")
EOF

status=0
for backend in ${GPU_CHECK_BACKENDS:-jax torch}; do
    say "== KERAS_BACKEND=$backend: devices"
    KERAS_BACKEND=$backend timeout 60 "$PY" -c '
import keras, sys
b = keras.backend.backend()
if b == "jax":
    import jax; print("  jax devices:", jax.devices())
elif b == "torch":
    import torch; print("  torch cuda:", torch.cuda.is_available(), torch.cuda.device_count(),
                        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("  tensorflow imported:", "tensorflow" in sys.modules)
' 2>&1 | tee -a "$LOG"

    say "== KERAS_BACKEND=$backend tandem bench predict --threads 64,256"
    KERAS_BACKEND=$backend timeout 240 "$PY" -m keras_tandem.cli bench predict \
        --threads 64,256 --coroutines 256 --duration 2 $NAIVE \
        --json "$OUT_DIR/predict-$backend.json" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" = 0 ] || { say "!! bench predict on $backend failed"; status=1; }

    say "== KERAS_BACKEND=$backend tandem bench train-serve --threads 64"
    KERAS_BACKEND=$backend timeout 150 "$PY" -m keras_tandem.cli bench train-serve \
        --threads 64 --rate 2000 --seconds 3 --reps 3 --skip-naive \
        --json "$OUT_DIR/train-serve-$backend.json" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" = 0 ] || { say "!! bench train-serve on $backend failed"; status=1; }
done

"$PY" - "$OUT_DIR" ${GPU_CHECK_BACKENDS:-jax torch} <<'EOF' 2>&1 | tee "$OUT_DIR/summary.txt" \
    | tee -a "$LOG"
import json, os, sys

out, backends = sys.argv[1], sys.argv[2:]
print("== summary (done when: Predictor on JAX >= 0.8x the hand-off ceiling at 256 threads;")
print("   fit >= 0.8x its speed alone while 64 clients predict)")
for backend in backends:
    def load(name):
        path = os.path.join(out, f"{name}-{backend}.json")
        return json.load(open(path)) if os.path.exists(path) else None
    p, t = load("predict"), load("train-serve")
    if p:
        rows = {(r["technique"], r.get("threads")): r for r in p["rows"]}
        def rps(technique, n):
            r = rows.get((technique, n))
            return f"{r['rps']:,.0f}" if r and r.get("rps") is not None else "-"
        print(f"{backend}: Predictor {rps('Predictor', 64)} / {rps('Predictor', 256)} req/s "
              f"at 64 / 256 threads; hand-off ceiling {rps('hand-off ceiling', 256)} at 256; "
              f"throughput_vs_handoff={p['ratios'].get('throughput_vs_handoff')}, "
              f"throughput_vs_naive={p['ratios'].get('throughput_vs_naive')}, "
              f"offline {rps('offline predict(batch_size=256)', 1)} samples/s, "
              f"call path {p.get('call_path')}")
        for (technique, n), r in rows.items():
            if r.get("first_error"):
                print(f"{backend}: {technique} at {n} threads: {r['errors']:,} failed "
                      f"({r['requests']:,} answered), e.g. {r['first_error'][:160]}")
    else:
        print(f"{backend}: no bench predict result")
    if t:
        r = t["ratios"]
        print(f"{backend}: train_vs_alone (open loop, {t['config']['rate']:g} req/s)="
              f"{r.get('train_vs_alone')}, train_vs_alone_closed (64 clients)="
              f"{r.get('train_vs_alone_closed')}, served_rps_closed={r.get('served_rps_closed')}, "
              f"p99_ms={r.get('p99_ms')}")
    else:
        print(f"{backend}: no bench train-serve result")
EOF
say "== results in $OUT_DIR"
exit $status
