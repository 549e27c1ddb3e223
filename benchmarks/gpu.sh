#!/usr/bin/env bash
# GPU training throughput in one command, offline, in under 8 minutes, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh            (from a checkout of this repository; PYTHON=... to pick the interpreter)
# 1. installs torch/timm/lightning/... from local wheels in ./.whl when they are missing (no network needed;
#    fill .whl on a connected machine with the same Python version and platform as the GPU machine:
#    pip download -d .whl torch torchvision timm lightning numpy pandas pillow tqdm);
# 2. prints training images/s of efficientnet_b3 at the default 240x320, batch 128, on a generated batch, for
#    the reference recipe (fp32 NCHW, BCE), bf16, bf16 + channels_last and bf16 + channels_last + torch.compile;
# 3. generates 64 full-size JPEGs and prints the images/s of one loader epoch with min(8, CPUs) workers, ours
#    (prepared cache) against the reference way of decoding the originals every epoch, to set beside step 2.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
BACKBONE="${BACKBONE:-efficientnet_b3}"
BATCH="${BATCH:-128}"
# Deadline per step, so that the whole script stays under 8 minutes even when something hangs.
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-300}"
LOADER_TIMEOUT="${LOADER_TIMEOUT:-90}"

modules_present() {
    "$PY" - <<'EOF'
import importlib.util, sys
needed = ["torch", "torchvision", "timm", "lightning", "numpy", "pandas", "PIL", "tqdm"]  # what the benchmarks import
missing = [m for m in needed if importlib.util.find_spec(m) is None]
print(" ".join(missing))
sys.exit(1 if missing else 0)
EOF
}

started=$(date +%s)
if ! missing=$(modules_present); then
    echo "missing Python modules: $missing"
    if [[ ! -d .whl ]]; then
        echo "no ./.whl folder with wheels to install them from offline; see the header of $0" >&2
        exit 1
    fi
    "$PY" -m pip install --no-index --find-links .whl --quiet torch torchvision timm lightning numpy pandas pillow tqdm
fi
# The benchmarks import fashion_tagger from this checkout; no build or install of the project is needed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # pretrained=False everywhere; never wait on the hub

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not available"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

echo
echo "== training throughput: $BACKBONE 240x320, batch $BATCH =="
timeout "$TRAIN_TIMEOUT" "$PY" benchmarks/train_throughput.py --device cuda --backbone "$BACKBONE" \
    --width 240 --height 320 --batch-size "$BATCH" --steps 20 --warmup 10 --rounds 3 \
    --settings reference,bf16,bf16+cl,bf16+cl+compile \
    || echo "training benchmark failed or ran past ${TRAIN_TIMEOUT}s (exit $?)"

echo
echo "== data loading: generated 1800x2400 JPEGs, reference (decode originals every epoch) vs prepared cache =="
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
timeout "$LOADER_TIMEOUT" "$PY" benchmarks/loader.py --images 64 --batch-size 64 --workers "$workers" --rounds 2 \
    || echo "loader benchmark failed or ran past ${LOADER_TIMEOUT}s (exit $?)"

echo
echo "done in $(( $(date +%s) - started ))s"
