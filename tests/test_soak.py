"""Soak: a long quick_test run, killed and resumed again and again, ends with the weights of an
uninterrupted run, and its memory stays flat. Several minutes, so it runs only when asked:

    SOAK=1 python -m pytest -q -s tests/test_soak.py
"""

import os
import random
import signal
import time

import pytest

from test_cli import RUN, TINY, assert_ok, load_ckpt, read_loss_log, run_cli
import test_cli

cifar_dir = test_cli.cifar_dir  # fixtures shared with test_cli
from test_never_lose_a_run import assert_whole_run_folder, same_tensors, start

pytestmark = pytest.mark.skipif(not os.environ.get("SOAK"), reason="soak test: set SOAK=1 to run it (minutes)")

STEPS = 2500  # 500 epochs of the 80 test images
FLAGS = [*TINY, "--dropout", "0.1", "--sample_every", "0", "--epochs", str(STEPS // 5), "--max_steps", str(STEPS),
         "--save_every", "50", "--save_every_steps", "7", "--keep_last", "2", "--log_every", "10"]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def run_watching_memory(args, cwd, until=None):
    """Run to the end (or kill -9 after `until` seconds); the RSS samples, one every 0.5 s."""
    process, samples, started = start(*args, cwd=cwd), [], time.monotonic()
    while process.poll() is None:
        try:
            samples.append((time.monotonic() - started, rss_mb(process.pid)))
        except (OSError, StopIteration):
            pass
        if until is not None and time.monotonic() - started > until:
            process.send_signal(signal.SIGKILL)
        time.sleep(0.5)
    return process.returncode, samples


def test_soak_kill_and_resume_cycles_end_at_the_uninterrupted_weights_with_flat_memory(cifar_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    code, samples = run_watching_memory([*FLAGS, "--data_dir", cifar_dir], reference)
    assert code == 0
    duration = samples[-1][0]
    steady = [mb for t, mb in samples if t > 0.2 * duration]
    quarter = max(1, len(steady) // 4)
    early, late = sorted(steady[:quarter])[quarter // 2], sorted(steady[-quarter:])[quarter // 2]
    print(f"\nuninterrupted: {STEPS} steps in {duration:.0f} s; RSS {early:.0f} MB early, {late:.0f} MB late, "
          f"peak {max(mb for _, mb in samples):.0f} MB")
    assert late < early * 1.05 + 20, f"memory grew from {early:.0f} MB to {late:.0f} MB"

    rng, run_dir, cycles = random.Random(7), killed / "checkpoints" / RUN, 0
    while True:
        resume = ["--run_name", RUN, "--resume", "latest"] if (run_dir / "latest.pt").exists() else []
        until = rng.uniform(3, duration / 4) if cycles < 6 else None
        code, _ = run_watching_memory([*FLAGS, *resume, "--data_dir", cifar_dir], killed, until)
        if until is None or code == 0:
            assert code == 0
            break
        cycles += 1
        step = load_ckpt(run_dir / "latest.pt")["step"] if (run_dir / "latest.pt").exists() else 0
        print(f"kill -9 #{cycles} after {until:.1f} s: latest.pt at step {step}")
        assert_whole_run_folder(run_dir, settled=False)
    assert cycles >= 5
    done, expected = load_ckpt(run_dir / "latest.pt"), load_ckpt(reference / "checkpoints" / RUN / "latest.pt")
    assert done["step"] == expected["step"] == STEPS
    assert same_tensors(done["model"], expected["model"]) and same_tensors(done["ema"], expected["ema"])
    columns = ("step", "loss", "lr", "grad_norm", "bad_steps")
    rows = [[r[c] for c in columns] for r in read_loss_log(run_dir / "loss_log.csv")]
    assert rows == [[r[c] for c in columns] for r in read_loss_log(reference / "checkpoints" / RUN / "loss_log.csv")]
    assert_whole_run_folder(run_dir)
    assert_ok(run_cli("--mode", "sample", "--checkpoint", run_dir, "--num_samples", "4", "--sampling_steps", "5",
                      cwd=killed))
