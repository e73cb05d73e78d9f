#!/usr/bin/env bash
# One command for a fresh GPU machine, under 8 minutes: its timeouts add up to 475 s (each counted
# once; only a machine whose python3 lacks torch probes more than one interpreter):
#
#     bash bench/gpu_check.sh            # OUT=results/ WORK=/scratch/gpu_check bash bench/gpu_check.sh
#
# 0. the interpreter: $PYTHON, else python3, whichever imports torch first, used as it is (no pip);
#    only when neither does, a virtual environment .venv-gpu (--system-site-packages) and one quick,
#    optional pip install that gives up at once offline. No CUDA GPU: one line on stderr, exit 2;
# 1. the environment: torch, torchvision, CUDA, cuDNN, the GPU, nvidia-smi, missing modules;
# 2. tests/test_cuda.py, stopping at the first failure (180 s at most);
# 3. bench/bench_train.py on the paper's model, batch 128, bf16 autocast: eager (35 s), then
#    torch.compile (95 s), each its own process, so a slow compile cannot cost the eager row;
# 4. the largest power-of-two batch that trains (35 s), then 24 s of the cifar10 preset (50 s):
#    on CIFAR-10 when ./data holds it, else on random images written under $WORK (the speed is the
#    same; the pictures are noise);
# 5. a summary table, printed and written to $OUT/summary.md.
# Each step prints as it goes and appends to its file in $OUT (default gpu_check_out/, relative to
# the repository root), stderr included, so a killed run keeps what it finished: env.txt,
# test_cuda.txt, bench_eager.txt, bench_compile.txt, largest_batch.txt, train.txt, summary.md; seven
# small files. Checkpoints, samples and data go to $WORK (default /tmp/gpu_check_work), never $OUT.
# Exit status: 0 all passed, 1 a step failed or timed out, 2 no CUDA GPU, 3 no Python with torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
WORK=${WORK:-/tmp/gpu_check_work}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$SECONDS
FAILED=0

say() { printf '%s\n' "$*" | tee -a "$OUT/env.txt"; }
no_gpu() { printf 'gpu_check: needs a CUDA GPU: %s; nothing was run\n' "$*" | tee -a "$OUT/env.txt" >&2; exit 2; }

# step FILE TITLE COMMAND...: runs COMMAND with its stdout and stderr shown and appended to $OUT/FILE
# as they come, then a line with its exit status and seconds (the summary reads these lines).
step() {
    local file=$OUT/$1 title=$2 start=$SECONDS rc verdict
    shift 2
    printf '\n=== %s ===\n' "$title" | tee -a "$file"
    "$@" 2>&1 | tee -a "$file"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) verdict="ok" ;;
        124) verdict="TIMED OUT" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    printf '[gpu_check] %s: %s, %ss\n' "$title" "$verdict" $((SECONDS - start)) | tee -a "$file"
    return "$rc"
}

# --- 0. the interpreter: one that already has torch; a venv and pip only when there is none ---------
# imports_torch PATH: PATH's python imports torch; sets PY, TORCH (its version) and CUDA (1 or 0).
imports_torch() {
    local info
    info=$(timeout 20 "$1" -c 'import torch; print(torch.__version__, int(torch.cuda.is_available()))' \
        2>>"$OUT/env.txt") || { say "($1 does not import torch: its error is in $OUT/env.txt)"; return 1; }
    PY=$1 TORCH=${info% *} CUDA=${info##* }
}
PY= TORCH= CUDA=
for cand in ${PYTHON:+"$PYTHON"} python3; do
    path=$(command -v "$cand") && imports_torch "$path" && break
done
if [ -z "$PY" ]; then
    # No torch anywhere yet: look for a GPU the cheap way before building anything.
    [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null \
        || no_gpu "no NVIDIA driver here (no /dev/nvidiactl, no nvidia-smi)"
    command -v python3 >/dev/null || { say "gpu_check: no python3 to build .venv-gpu with" >&2; exit 3; }
    [ -x .venv-gpu/bin/python ] || timeout 10 python3 -m venv --system-site-packages .venv-gpu >>"$OUT/env.txt" 2>&1
    if [ -f .venv-gpu/bin/activate ]; then
        . .venv-gpu/bin/activate
        timeout 15 python -m pip install -q --disable-pip-version-check --retries 0 --timeout 5 \
            -r requirements.txt pytest >>"$OUT/env.txt" 2>&1 \
            || say "pip could not install (offline?): going on with the installed packages (pip's words: $OUT/env.txt)"
        imports_torch "$PWD/.venv-gpu/bin/python"
    fi
    [ -n "$PY" ] || { say "gpu_check: no Python with torch (tried ${PYTHON:+\$PYTHON, }python3, .venv-gpu); see $OUT/env.txt" >&2; exit 3; }
fi
say "python: $PY (torch $TORCH)"
[ "$CUDA" = 1 ] || no_gpu "torch $TORCH at $PY sees none (torch.cuda.is_available() is False)"

# --- 1. the environment ------------------------------------------------------------------------------
step env.txt "environment" timeout 15 "$PY" - <<'EOF'
import importlib.util, subprocess, sys
import torch
try:
    import torchvision
    vision = torchvision.__version__
except Exception as e:  # train_ddpm.py needs it only for FID features; say so and go on
    vision = f"not importable ({type(e).__name__}: {e})"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} | torchvision {vision} | CUDA {torch.version.cuda} | cuDNN "
      f"{torch.backends.cudnn.version()} | Python {sys.version.split()[0]}")
print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
      f"{p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=5)
    print(f"nvidia-smi: {(smi.stdout or smi.stderr).strip().splitlines()[0]}")
except Exception as e:
    print(f"nvidia-smi: did not answer ({type(e).__name__}: {e})")
needed = {"numpy": "train_ddpm.py", "tqdm": "train_ddpm.py", "PIL": "tests", "pytest": "tests",
          "matplotlib": "plot_loss.py", "diffusers": "bench_train.py's diffusers rows (skipped without)"}
missing = [f"{m} ({who})" for m, who in needed.items() if importlib.util.find_spec(m) is None]
print(f"missing modules: {', '.join(missing) or 'none'}")
import train_ddpm  # noqa: E402  the last line: every later step needs it, so fail here if it cannot
print("train_ddpm.py imports")
EOF

# --- 2. every CUDA branch, briefly ---------------------------------------------------------------
step test_cuda.txt "tests/test_cuda.py" \
    timeout 180 "$PY" -m pytest -v -x -p no:cacheprovider tests/test_cuda.py

# --- 3. the paper's model, bf16: eager, then compiled (each prints its table when it is done) -------
step bench_eager.txt "bench_train.py: paper model, eager, bf16" \
    timeout 35 "$PY" bench/bench_train.py --rows ours
step bench_compile.txt "bench_train.py: paper model, torch.compile, bf16" \
    timeout 95 "$PY" bench/bench_train.py --rows ours_compile

# --- 4. the largest batch, then the cifar10 preset -----------------------------------------------
# No rows at batch 128 (--rows ""): only the doubling search, whose "trying batch N" lines tell what
# fitted even if it is killed or crashes.
step largest_batch.txt "bench_train.py: largest batch, eager, bf16" \
    timeout 35 "$PY" bench/bench_train.py --rows "" --largest_batch --steps 3

DATA=data
if [ ! -f data/cifar-10-batches-py/data_batch_5 ]; then
    DATA=$WORK/data
    if [ ! -f "$DATA/cifar-10-batches-py/data_batch_5" ]; then
        step train.txt "random images in CIFAR-10's layout (no ./data)" timeout 10 "$PY" - "$DATA" <<'EOF'
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
fi
LINEBUF=()
command -v stdbuf >/dev/null && LINEBUF=(stdbuf -oL)
train() {  # tqdm redraws its bar with \r: one line per redraw, at most one every 5 s
    rm -rf "$WORK/checkpoints/gpu_check" "$WORK/samples/gpu_check"
    TQDM_MININTERVAL=5 timeout 50 "$PY" train_ddpm.py --mode train --preset cifar10 --device cuda \
        --data_dir "$DATA" --max_minutes 0.4 --run_name gpu_check --checkpoint_dir "$WORK/checkpoints" \
        --samples_dir "$WORK/samples" --val_size 0 --save_every_minutes 0 2>&1 \
        | ${LINEBUF[@]+"${LINEBUF[@]}"} tr '\r' '\n' | grep --line-buffered -v '^[[:space:]]*$'
    local rc=${PIPESTATUS[0]}
    [ -f "$WORK/checkpoints/gpu_check/loss_log.csv" ] \
        && { echo "loss_log.csv, header and last rows:"; sed -n 1p "$WORK/checkpoints/gpu_check/loss_log.csv";
             tail -n +2 "$WORK/checkpoints/gpu_check/loss_log.csv" | tail -n 3; }
    return "$rc"
}
step train.txt "24 s of the cifar10 preset on $DATA" train

# --- 5. the summary ----------------------------------------------------------------------------------
printf '\n=== summary ===\n'
timeout 10 "$PY" - "$OUT" "$WORK" $((SECONDS - START)) <<'EOF' 2>&1 | tee "$OUT/summary.md"
import csv, re, sys
from pathlib import Path
out, work, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def text(name):
    return (out / name).read_text(errors="replace") if (out / name).exists() else ""
def status(name):  # the step's own "[gpu_check] title: verdict, Ns" lines, joined
    found = re.findall(r"^\[gpu_check\] [^:]*: (.*)$", text(name), re.M)
    return "; ".join(found) or "did not run"
def first(pattern, name, default="-"):
    m = re.search(pattern, text(name), re.M)
    return m.group(1).strip() if m else default
def bench(name):
    rows = [line.split("|")[1:-1] for line in text(name).splitlines() if re.match(r"\| ours", line)]
    if not rows:
        return f"no table ({status(name)})"
    return "; ".join(f"batch {r[1].strip()}: {r[2].strip()} images/s, {r[3].strip()} ms/step, peak {r[4].strip()}, "
                     f"MFU {r[5].strip()}" for r in rows)
rows = [("python", first(r"^python: (.*)$", "env.txt")),
        ("versions", first(r"^(torch .*)$", "env.txt")),
        ("GPU", first(r"^GPU: (.*)$", "env.txt")),
        ("nvidia-smi", first(r"^nvidia-smi: (.*)$", "env.txt")),
        ("missing modules", first(r"^missing modules: (.*)$", "env.txt")),
        ("environment step", status("env.txt"))]
tests = [l for l in text("test_cuda.txt").splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
last_test = re.findall(r"^(tests/test_cuda.py::\S+)", text("test_cuda.txt"), re.M)
rows.append(("tests/test_cuda.py", (tests[-1].strip("= ") if tests else
             f"no pytest summary, last test started: {last_test[-1] if last_test else '-'}") + f" ({status('test_cuda.txt')})"))
rows.append(("paper model, eager bf16", bench("bench_eager.txt")))
rows.append(("paper model, torch.compile bf16", bench("bench_compile.txt")))
tried = [int(b) for b in re.findall(r"trying batch (\d+)", text("largest_batch.txt"))]
largest = bench("largest_batch.txt")
if largest.startswith("no table") and tried:  # killed or crashed: every batch but the last one tried fitted
    error = [l for l in text("largest_batch.txt").splitlines() if re.match(r"[\w.]*(Error|Exception)\b", l)]
    largest = (f"no table; fitted: {', '.join(map(str, tried[:-1])) or 'none'}; stopped while trying {tried[-1]}"
               + (f" with {error[-1][:200]}" if error else "") + f" ({status('largest_batch.txt')})")
rows.append(("largest batch", largest))
log = work / "checkpoints" / "gpu_check" / "loss_log.csv"
logged = [r for r in csv.DictReader(open(log)) if r.get("loss")] if log.exists() else []
if logged:
    r = logged[-1]
    train = (f"step {int(r['step']):,}, epoch {float(r['epoch']):.2f}, loss {r['loss']}, {r['images_per_s']} images/s "
             f"(last loss-log row)")
else:
    train = "no loss log: see train.txt"
rows.append(("cifar10 preset, 24 s", f"{train} ({status('train.txt')})"))
print(f"gpu_check summary ({seconds} s in all)\n\n| check | result |\n|---|---|")
for name, value in rows:
    print(f"| {name} | {value.replace('|', '/')} |")
EOF
[ "$FAILED" = 0 ] || { echo "gpu_check: $FAILED step(s) failed or timed out: see $OUT/"; exit 1; }
