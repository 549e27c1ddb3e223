#!/usr/bin/env bash
# GPU training throughput in one command, offline, in under 10 minutes, on a machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh            (from a checkout of this repository; PYTHON=... to pick the interpreter)
#   bash benchmarks/gpu.sh --dry-run  (every step on a CPU, tiny, to check the script itself; no GPU needed)
# 1. installs torch/timm/lightning/... from local wheels in ./.whl when they are missing (no network needed;
#    fill .whl on a connected machine with the same Python version and platform as the GPU machine:
#    pip download -d .whl -c constraints.txt $PACKAGES, PACKAGES as below);
# 2. the production recipe through the project's own training (benchmarks/gpu_train.py): efficientnet_b3 on the real
#    60x80 images of images-small upsampled to 240x320 (FASHION_TAGGER_REAL_DATA, else ../shared/data/fashion-real,
#    else a generated dataset), bf16 + channels_last, eager and torch.compile, batch 64-256, 16 loader workers:
#    training images/s, peak GPU memory, nvidia-smi utilisation, and whether the loader keeps up;
# 3. training images/s of efficientnet_b3 on a batch held on the GPU (the network alone), reference recipe
#    (fp32 NCHW, BCE) against bf16, bf16 + channels_last and bf16 + channels_last + torch.compile;
# 4. one loader epoch on 64 generated full-size JPEGs, ours (prepared cache) against decoding the originals.
# Results: printed, and JSON under $OUT (default $TMPDIR/fashion-tagger-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
BACKBONE="${BACKBONE:-efficientnet_b3}"
BATCH="${BATCH:-128}"
SETTINGS="${SETTINGS:-eager:64,eager:128,eager:256,compile:128,compile:256}"  # the recipe's (compile, batch) settings
EPOCHS="${EPOCHS:-4}"  # per setting of the recipe; the first is not counted
OUT="${OUT:-${TMPDIR:-/tmp}/fashion-tagger-gpu}"  # the device runner sets OUT to the folder it brings back
# Deadline per step, so that the whole script stays under 10 minutes even when something hangs.
RECIPE_TIMEOUT="${RECIPE_TIMEOUT:-330}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-150}"
LOADER_TIMEOUT="${LOADER_TIMEOUT:-60}"
mkdir -p "$OUT"

PACKAGES="torch torchvision timm lightning numpy pandas pillow tqdm pyarrow scikit-learn pyyaml pydantic matplotlib
    iterative-stratification safetensors sqlalchemy alembic"
DATA="${FASHION_TAGGER_REAL_DATA:-}"
for candidate in ../shared/data/fashion-real shared/data/fashion-real; do
    if [[ -z "$DATA" && -d "$candidate/images-small" ]]; then DATA="$(cd "$candidate" && pwd)"; fi
done

modules_present() {
    "$PY" - <<'EOF'
import importlib.util, sys
needed = ["torch", "torchvision", "timm", "lightning", "numpy", "pandas", "PIL", "tqdm", "pyarrow", "sklearn", "yaml",
          "pydantic", "matplotlib", "iterstrat", "safetensors",
          "sqlalchemy", "alembic"]  # what the benchmarks and the training stage import (the split's test membership)
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
    "$PY" -m pip install --no-index --find-links .whl --quiet $PACKAGES
fi
# The benchmarks import fashion_tagger from this checkout; no build or install of the project is needed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # pretrained=False everywhere; never wait on the hub

if (( DRY_RUN )); then
    echo "== dry run on the CPU: every step, tiny =="
    "$PY" benchmarks/gpu_train.py --dry-run --json "$OUT/gpu_train.json"
    "$PY" benchmarks/train_throughput.py --device cpu --backbone test_efficientnet --width 48 --height 64 --batch-size 4 \
        --steps 1 --warmup 1 --rounds 1 --settings reference,bf16+cl
    "$PY" benchmarks/loader.py --images 4 --batch-size 4 --workers 0 --rounds 1
    echo "dry run done in $(( $(date +%s) - started ))s"
    exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not available"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"

echo
echo "== production recipe through train_model: $BACKBONE 240x320, bf16 + channels_last, 16 workers =="
timeout "$RECIPE_TIMEOUT" "$PY" benchmarks/gpu_train.py --backbone "$BACKBONE" ${DATA:+--data "$DATA"} \
    --workers 16 --settings "$SETTINGS" --epochs "$EPOCHS" --json "$OUT/gpu_train.json" \
    || echo "production-recipe benchmark failed or ran past ${RECIPE_TIMEOUT}s (exit $?)"

echo
echo "== training throughput, network alone: $BACKBONE 240x320, batch $BATCH =="
timeout "$TRAIN_TIMEOUT" "$PY" benchmarks/train_throughput.py --device cuda --backbone "$BACKBONE" \
    --width 240 --height 320 --batch-size "$BATCH" --steps 20 --warmup 10 --rounds 3 \
    --settings reference,bf16,bf16+cl,bf16+cl+compile \
    || echo "training benchmark failed or ran past ${TRAIN_TIMEOUT}s (exit $?)"

echo
echo "== data loading: generated 1800x2400 JPEGs, reference (decode originals every epoch) vs prepared cache =="
workers=$(( $(nproc) < 16 ? $(nproc) : 16 ))
timeout "$LOADER_TIMEOUT" "$PY" benchmarks/loader.py --images 64 --batch-size 64 --workers "$workers" --rounds 2 \
    || echo "loader benchmark failed or ran past ${LOADER_TIMEOUT}s (exit $?)"

echo
echo "done in $(( $(date +%s) - started ))s"
