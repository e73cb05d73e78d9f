"""bench/gpu_check.sh on a CPU machine, in seconds: the real script in a subprocess.

It must stop at once with one line where there is no CUDA GPU, take a python3 that imports torch as
it is (no .venv-gpu, no pip), keep its timeouts under the device budget, and, driven by a fake
interpreter that answers each step with canned output, leave a small $OUT with the summary the
steps' outputs add up to. The script is copied into a temporary tree, so nothing lands in the repo.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUDGET_S = 480  # the device machine's 8 minutes
FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # A stand-in interpreter: "imports torch" and sees a GPU; each step of gpu_check.sh gets canned output.
    if [ "$1" = -c ]; then echo "2.11.0+fake 1"; exit 0; fi
    if [ "$1" = - ]; then
        case $# in
            1) cat >/dev/null; echo "torch 2.11.0+fake | torchvision 0.26.0 | CUDA 12.8 | cuDNN 91000 | Python 3.12.0"
               echo "GPU: 1 x NVIDIA H200, 140 GiB, compute capability 9.0, bf16 yes"
               echo "nvidia-smi: NVIDIA H200, 143771 MiB, 570.00, 700.00 W"; echo "missing modules: none" ;;
            2) cat >/dev/null; mkdir -p "$2/cifar-10-batches-py"; echo "wrote nothing to $2" ;;
            *) exec "$REAL_PYTHON" "$@" ;;  # the summary: the real thing
        esac
        exit 0
    fi
    case "$*" in
        *"-m pytest"*) echo "tests/test_cuda.py::test_one PASSED"; echo "tests/test_cuda.py::test_two PASSED"
                       echo "========== 2 passed in 1.00s ==========" ;;
        *"--rows ours_compile"*) echo "compiling..."; echo "RuntimeError: inductor fell over" >&2; exit 1 ;;
        *"--largest_batch"*) echo "  ours: trying batch 128" >&2; echo "  ours: trying batch 256" >&2
                             echo "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED" >&2; exit 1 ;;
        *"--rows ours"*) echo "| row | batch | train images/s | step ms | peak GPU memory | MFU | sampling |"
                         echo "|---|---|---|---|---|---|---|"
                         echo "| ours (train_ddpm.py defaults: bf16 autocast, channels_last) | 128 | 9000.0 | 14 | 9.9 GB | 40% | 30000.0 |" ;;
        *train_ddpm.py*) while [ $# -gt 0 ]; do [ "$1" = --checkpoint_dir ] && ckpt=$2; shift; done
                         mkdir -p "$ckpt/gpu_check"
                         printf 'step,epoch,loss,lr,images_per_s\\n50,0.13,0.0712,1e-4,8765.4\\n' > "$ckpt/gpu_check/loss_log.csv"
                         printf 'epoch 1/500:  1%%| 5/390\\repoch 1/500:  2%%| 9/390\\r' >&2; echo "--max_minutes 0.4 reached" ;;
        *) echo "fake python: unexpected arguments: $*" >&2; exit 99 ;;
    esac
""")


def code_lines(text):
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def copy_script(tmp_path):
    """The script alone in a tree of its own: it cds to its parent's parent, so .venv-gpu and a
    default OUT would land here, not in the repository."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, tree / "bench" / SCRIPT.name)
    return tree


def fake_python3(folder, script):
    """An executable `python3` in folder (to put first on PATH) that runs the shell script given."""
    folder.mkdir(exist_ok=True)
    path = folder / "python3"
    path.write_text(script)
    path.chmod(0o755)
    return path


def wrapper(folder, target):
    """A python3 on PATH that runs target (a venv's python: a symlink would lose the venv)."""
    return fake_python3(folder, f'#!/bin/sh\nexec "{target}" "$@"\n')


def run(tree, tmp_path, bin_dir, **env):
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def describe(result):
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_small_results(tmp_path, tree):
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert all(p.stat().st_size < 64 * 1024 for p in files), [(p, p.stat().st_size) for p in files]
    work = tmp_path / "work"
    assert not any(p.is_file() and p.stat().st_size > 1024 * 1024 for p in work.rglob("*")) if work.exists() else True
    assert not (tree / ".venv-gpu").exists(), "made a venv although python3 imports torch"
    assert not (tree / "gpu_check_out").exists(), "wrote to the default OUT although OUT was set"


def assert_needs_gpu(result):
    assert result.returncode == 2, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], describe(result)
    assert "Traceback" not in result.stdout + result.stderr


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_its_timeouts_fit_the_device_budget():
    """Every shell timeout is a literal `timeout SECONDS` and together they stay under 8 minutes;
    pip's own --timeout is an option, not a step."""
    text = "\n".join(code_lines(SCRIPT.read_text()))
    uses = re.findall(r"(?<![-\w])timeout[ \t]+(\S+)", text)
    assert len(uses) >= 10, uses
    assert all(u.isdigit() for u in uses), f"a timeout that is not a literal number of seconds: {uses}"
    assert sum(map(int, uses)) < BUDGET_S, f"timeouts add up to {sum(map(int, uses))} s: {uses}"
    header = SCRIPT.read_text().split("set -uo")[0]
    assert f"{sum(map(int, uses))} s" in header, "the header comment's total is out of date"


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None,
                    reason="this machine has an NVIDIA driver")
def test_without_torch_on_path_it_stops_before_making_a_venv(tmp_path):
    """A python3 without torch and no NVIDIA driver: one line, exit 2, no .venv-gpu, no pip."""
    tree = copy_script(tmp_path)
    no_torch = fake_python3(tmp_path / "bin", "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    result = run(tree, tmp_path, no_torch.parent)
    assert_needs_gpu(result)
    assert "no NVIDIA driver" in result.stderr
    assert "No module named 'torch'" in (tmp_path / "out" / "env.txt").read_text(), "the probe's stderr was lost"
    assert_small_results(tmp_path, tree)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_on_a_cpu_machine_it_takes_python3_as_it_is_and_stops_with_one_line(tmp_path):
    tree = copy_script(tmp_path)
    python3 = wrapper(tmp_path / "bin", sys.executable)  # this venv's python: it imports torch
    result = run(tree, tmp_path, python3.parent)
    assert_needs_gpu(result)
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"python: {python3} (torch "), describe(result)
    assert "torch.cuda.is_available() is False" in result.stderr
    assert "pip could not install" not in result.stdout + result.stderr
    assert_small_results(tmp_path, tree)
    assert not (tmp_path / "work").exists()  # stopped before any step


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_python_wins_over_python3(tmp_path):
    tree = copy_script(tmp_path)
    no_torch = fake_python3(tmp_path / "bin", "#!/bin/sh\nexit 1\n")
    result = run(tree, tmp_path, no_torch.parent, PYTHON=sys.executable)
    assert_needs_gpu(result)
    assert result.stdout.splitlines()[0].startswith(f"python: {sys.executable} (torch "), describe(result)
    assert_small_results(tmp_path, tree)


def test_every_step_reports_into_a_small_out_and_the_summary_reads_them(tmp_path):
    """With a stand-in interpreter that 'has' a GPU: each step's output (stderr too) lands in its
    file, failures are counted, and summary.md says what each step gave, a crashed largest-batch
    search included."""
    tree = copy_script(tmp_path)
    fake = fake_python3(tmp_path / "bin", FAKE_PYTHON)
    result = run(tree, tmp_path, fake.parent, REAL_PYTHON=sys.executable)
    assert result.returncode == 1, describe(result)  # the compiled bench and the largest batch failed
    assert "2 step(s) failed" in result.stdout, describe(result)
    assert "unexpected arguments" not in result.stdout + result.stderr, describe(result)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.txt", "test_cuda.txt", "bench_eager.txt", "bench_compile.txt", "largest_batch.txt", "train.txt",
         "summary.md"])
    assert_small_results(tmp_path, tree)
    assert "RuntimeError: inductor fell over" in (out / "bench_compile.txt").read_text()  # stderr kept
    assert "[gpu_check] bench_train.py: paper model, torch.compile, bf16: FAILED (exit 1)" in (
        out / "bench_compile.txt").read_text()
    train = (out / "train.txt").read_text()
    assert "epoch 1/500:  2%| 9/390\n" in train and "\r" not in train  # one line per tqdm redraw
    assert train.count("step,epoch,loss") == 1 and "50,0.13,0.0712" in train  # the loss log's header and last rows
    summary = (out / "summary.md").read_text()
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.*) \|$", summary, re.M))
    assert rows["python"] == f"{fake} (torch 2.11.0+fake)"
    assert rows["GPU"].startswith("1 x NVIDIA H200")
    assert rows["tests/test_cuda.py"].startswith("2 passed in 1.00s (ok")
    assert rows["paper model, eager bf16"].startswith("batch 128: 9000.0 images/s, 14 ms/step, peak 9.9 GB, MFU 40%")
    assert rows["paper model, torch.compile bf16"].startswith("no table (")
    assert rows["largest batch"].startswith("no table; fitted: 128; stopped while trying 256 with "
                                            "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
    assert rows["cifar10 preset, 24 s"].startswith("step 50, epoch 0.13, loss 0.0712, 8765.4 images/s")


def test_the_largest_batch_search_counts_every_allocation_failure_and_nothing_else():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parents[1] / "bench" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert bench.out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    assert not bench.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
