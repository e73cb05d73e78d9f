#!/usr/bin/env bash
# One command for a fresh GPU machine (about 8 minutes on one H100):
#
#     bash bench/gpu_check.sh
#
# 1. set-up: a virtual environment that keeps the machine's own PyTorch (when it is 2.4 or newer) and
#    adds what is missing from pip; without pip access it goes on with what is installed;
# 2. tests/test_cuda.py: every CUDA branch against fp32 or the CPU;
# 3. bench/bench_train.py on the paper's model: images/s, MFU, peak memory, with and without
#    torch.compile, and the largest batch that fits;
# 4. a 3-minute cifar10-preset run: on CIFAR-10 when ./data holds it, else on random images it
#    writes itself (the speed is the same; the pictures are noise);
# then one summary to paste into BENCHMARKS.md. Everything lands in $OUT (default gpu_check_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
step() { printf '\n=== %s ===\n' "$*"; }

step "set-up"
if [ ! -d .venv-gpu ]; then
    python3 -m venv --system-site-packages .venv-gpu
fi
. .venv-gpu/bin/activate
timeout 240 pip install -q -r requirements.txt pytest -r bench/requirements.txt 2>&1 | tail -3 \
    || echo "pip could not install everything: going on with the installed packages"
python - <<'EOF' || exit 1
import torch, torchvision
assert torch.cuda.is_available(), "no CUDA GPU visible: this check is for a GPU machine"
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"

step "tests/test_cuda.py"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"

step "bench/bench_train.py: the paper's model"
timeout 240 python bench/bench_train.py --rows ours,ours_fp32,diffusers --compile --largest_batch 2>/dev/null \
    | tee "$OUT/bench_train.txt"

step "3 minutes of the cifar10 preset"
DATA=data
if [ ! -f data/cifar-10-batches-py/data_batch_5 ]; then
    DATA="$OUT/data"
    python - "$DATA" <<'EOF'
import pickle, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]) / "cifar-10-batches-py"
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(1, 6):  # CIFAR-10's layout and size: 5 x 10,000 random images
    batch = {b"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, 10_000).tolist()}
    with open(folder / f"data_batch_{i}", "wb") as f:
        pickle.dump(batch, f)
print(f"no CIFAR-10 in ./data: wrote 50,000 random images to {folder}")
EOF
fi
rm -rf "$OUT/checkpoints/gpu_check" "$OUT/samples/gpu_check"
timeout 300 python train_ddpm.py --mode train --preset cifar10 --data_dir "$DATA" --max_minutes 3 \
    --run_name gpu_check --checkpoint_dir "$OUT/checkpoints" --samples_dir "$OUT/samples" --val_size 0 \
    --save_every_minutes 0 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -15 | tee "$OUT/train.txt"

step "summary"
python - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_line(name, default="did not run"):
    lines = [l for l in (out / name).read_text().splitlines() if l.strip()] if (out / name).exists() else []
    return lines[-1] if lines else default
print("| check | result |\n|---|---|")
print(f"| GPU | {last_line('gpu.txt', 'unknown')} |")
print(f"| tests/test_cuda.py | {last_line('test_cuda.txt')} |")
log = out / "checkpoints" / "gpu_check" / "loss_log.csv"
rows = [r for r in csv.DictReader(open(log)) if r.get("loss")] if log.exists() else []
if rows:
    r = rows[-1]
    print(f"| cifar10 preset, 3 minutes | step {int(r['step']):,}, epoch {float(r['epoch']):.2f}, loss {r['loss']}, "
          f"{r['images_per_s']} images/s (last log row) |")
else:
    print("| cifar10 preset, 3 minutes | no loss log: see train.txt |")
print("\nbench/bench_train.py (paper model):\n")
print("\n".join(l for l in (out / "bench_train.txt").read_text().splitlines() if l.startswith(("|", "-", "device", "UNet")))
      if (out / "bench_train.txt").exists() else "did not run")
EOF
