"""Nothing is lost, nothing gets in: signals, kill -9, exact resume, non-finite steps, locks, a full
disk, weights-only files. Real subprocesses, real signals, real files."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import (OFFLINE, RUN, SCRIPT, STEPS_PER_EPOCH, TINY, assert_ok, describe, load_ckpt, read_loss_log,
                      run_cli)
import test_cli

cifar_dir, trained = test_cli.cifar_dir, test_cli.trained  # fixtures shared with test_cli

# Long enough to be interrupted: 5 steps per epoch on the 80 test images, no previews or validation.
LONG = [*TINY, "--sample_every", "0", "--val_size", "0", "--epochs", "400", "--save_every", "1000"]
LOG_VALUES = ("step", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "bad_steps",
              "val_loss")


def start(*args, cwd):
    env = {**os.environ, **OFFLINE}
    out, err = open(cwd / "stdout.txt", "w"), open(cwd / "stderr.txt", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, stdout=out,
                            stderr=err, stdin=subprocess.DEVNULL)


def wait_for_rows(log, rows, process, timeout=120):
    """Until the loss log holds `rows` training rows (the run is past its start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended early with {process.returncode}"
        if log.exists() and sum(1 for r in read_loss_log(log) if r.get("loss")) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not start training in time")


def assert_whole_run_folder(run_dir, settled=True):
    """Every checkpoint loads, the loss log's steps never repeat, and (once a run has ended by
    itself or by a signal, not by kill -9) no temporary file is left."""
    for p in run_dir.glob("*.pt"):
        assert isinstance(load_ckpt(p), dict), p
    if settled:
        assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    steps = [int(r["step"]) for r in read_loss_log(run_dir / "loss_log.csv") if r.get("loss")]
    assert steps == sorted(set(steps)), steps


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. Signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_prints_the_command_that_resumes(cifar_dir, tmp_path, sig, code):
    process = start(*LONG, "--data_dir", cifar_dir, cwd=tmp_path)
    run_dir = tmp_path / "checkpoints" / RUN
    wait_for_rows(run_dir / "loss_log.csv", 2, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == code, (tmp_path / "stderr.txt").read_text()[-2000:]
    last_line = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert last_line.startswith(signal.Signals(sig).name) and "resume with: python train_ddpm.py" in last_line
    ckpt = load_ckpt(run_dir / "latest.pt")
    logged = [int(r["step"]) for r in read_loss_log(run_dir / "loss_log.csv")]
    assert ckpt["step"] >= max(logged) and f"stopped at step {ckpt['step']} " in last_line
    assert not (run_dir / ".lock").exists(), "the lock is released"
    assert_whole_run_folder(run_dir)
    # The printed command resumes the run (here with a near limit so that it ends).
    command = last_line.split("resume with: ")[1].split()
    assert command[:2] == ["python", "train_ddpm.py"]
    result = run_cli(*command[2:], "--max_steps", ckpt["step"] + 3, cwd=tmp_path)
    assert_ok(result)
    assert load_ckpt(run_dir / "latest.pt")["step"] == ckpt["step"] + 3


def test_a_second_ctrl_c_quits_at_once_and_leaves_every_file_whole(cifar_dir, tmp_path):
    process = start(*LONG, "--save_every_steps", "1", "--data_dir", cifar_dir, cwd=tmp_path)
    run_dir = tmp_path / "checkpoints" / RUN
    wait_for_rows(run_dir / "loss_log.csv", 2, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
    assert_whole_run_folder(run_dir)
    step = load_ckpt(run_dir / "latest.pt")["step"]
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", step + 2, cwd=tmp_path))


# --- 2. kill -9 at random moments ---------------------------------------------------------------------

def test_kill_9_at_six_random_moments_always_resumes_to_the_uninterrupted_weights(cifar_dir, tmp_path):
    # 100 steps: each of the six lives dies 0.5-4 s after its start, about 2 s of which are start-up,
    # so together they train far fewer steps than that and every kill lands before the run ends.
    flags = [*TINY, "--sample_every", "0", "--val_size", "0", "--dropout", "0.1", "--epochs", "20",
             "--save_every_steps", "1", "--data_dir", cifar_dir]
    total = 20 * 5
    reference = tmp_path / "reference"
    reference.mkdir()
    assert_ok(run_cli(*flags, "--save_every_steps", "0", cwd=reference))  # saving changes no weight
    work = tmp_path / "killed"
    work.mkdir()
    run_dir = work / "checkpoints" / RUN
    rng = random.Random(20261123)
    kills = 0
    while kills < 6:
        resume = ["--run_name", RUN, "--resume", "latest"] if (run_dir / "latest.pt").exists() else []
        process = start(*flags, *resume, cwd=work)
        time.sleep(rng.uniform(0.5, 4.0))  # start-up takes about 2 s: some kills land before training
        if process.poll() is not None:
            break  # it finished first
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if (run_dir / "latest.pt").exists():
            assert_whole_run_folder(run_dir, settled=False)
    assert kills >= 5, f"only {kills} kills landed before the run finished"
    # on a busy machine every kill may land before the first save: then the run starts afresh
    resume = ["--run_name", RUN, "--resume", "latest"] if (run_dir / "latest.pt").exists() else []
    result = run_cli(*flags, *resume, cwd=work)
    if "already at step" not in result.stderr:
        assert_ok(result)
    done, expected = load_ckpt(run_dir / "latest.pt"), load_ckpt(reference / "checkpoints" / RUN / "latest.pt")
    assert done["step"] == expected["step"] == total
    assert same_tensors(done["model"], expected["model"]) and same_tensors(done["ema"], expected["ema"])
    assert_whole_run_folder(run_dir)


# --- 3. Exact resume -----------------------------------------------------------------------------------

def test_n_plus_m_steps_equal_n_steps_then_a_resume_for_m_bit_for_bit(cifar_dir, tmp_path):
    # Dropout on, and N = 7 lies mid-epoch and off the --log_every 2 grid; power EMAs on, with a snapshot
    # every 3 steps.
    flags = [*TINY, "--dropout", "0.1", "--sample_every", "0", "--epochs", "3", "--data_dir", cifar_dir,
             "--ema_profiles", "0.05,0.1", "--ema_snapshot_every", "48"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert_ok(run_cli(*flags, "--max_steps", "13", cwd=one))
    assert_ok(run_cli(*flags, "--max_steps", "7", cwd=two))
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", "13", cwd=two))
    a, b = load_ckpt(one / "checkpoints" / RUN / "latest.pt"), load_ckpt(two / "checkpoints" / RUN / "latest.pt")
    assert a["step"] == b["step"] == 13
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"], b["ema"])
    assert same_tensors(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert all(same_tensors(p, q) for p, q in zip(a["power_ema"]["models"], b["power_ema"]["models"]))
    snapshots_a, snapshots_b = (sorted((d / "checkpoints" / RUN / "ema_snapshots").iterdir()) for d in (one, two))
    assert [p.name for p in snapshots_a] == [p.name for p in snapshots_b] == [f"ema_step{s:09d}.pt" for s in (3, 6, 9, 12)]
    for p, q in zip(snapshots_a, snapshots_b):
        assert all(same_tensors(x, y) for x, y in zip(load_ckpt(p)["models"], load_ckpt(q)["models"]))
    rows_a, rows_b = (read_loss_log(d / "checkpoints" / RUN / "loss_log.csv") for d in (one, two))
    assert [{k: r[k] for k in LOG_VALUES} for r in rows_a] == [{k: r[k] for k in LOG_VALUES} for r in rows_b]
    assert [(r["step"], r["session"]) for r in rows_b if int(r["step"]) > 6] == [(s, "1") for s in ("8", "10", "12", "13")]


def test_a_gradient_accumulation_run_resumes_bit_for_bit_keeps_k_and_may_change_it(cifar_dir, tmp_path):
    # with log-normal timesteps, drawn from the host table on the device
    flags = [*TINY, "--dropout", "0", "--sample_every", "0", "--epochs", "4", "--grad_accum", "2",
             "--t_sampling", "lognormal", "--data_dir", cifar_dir]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert_ok(run_cli(*flags, "--max_steps", "13", cwd=one))
    # --resume auto, as a cluster job script uses it: the first start begins the run, the next resumes it
    first = run_cli(*flags, "--max_steps", "7", "--resume", "auto", cwd=two)
    assert_ok(first)
    assert "no checkpoint of this run yet, starting it" in first.stdout
    again = run_cli("--run_name", RUN, "--resume", "auto", "--max_steps", "13", cwd=two)
    assert_ok(again)
    assert "resuming" in again.stdout
    a, b = load_ckpt(one / "checkpoints" / RUN / "latest.pt"), load_ckpt(two / "checkpoints" / RUN / "latest.pt")
    assert a["step"] == b["step"] == 13 and b["config"]["grad_accum"] == 2, "the resume kept K"
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"], b["ema"])
    # A smaller GPU on the next leg: K may change, and the update stays the same to float rounding.
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", "16", cwd=one))
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", "16", "--grad_accum", "4", cwd=two))
    a, b = load_ckpt(one / "checkpoints" / RUN / "latest.pt"), load_ckpt(two / "checkpoints" / RUN / "latest.pt")
    assert b["config"]["grad_accum"] == 4 and a["step"] == b["step"] == 16
    # Compared as functions, not weight by weight: the key bias of attention gets a gradient of exactly zero
    # in exact arithmetic (softmax ignores a constant added to every key), so Adam turns its rounding noise
    # into full-size steps whose values differ with K and yet change no output.
    torch.manual_seed(0)
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 5, 10, 19])
    with torch.no_grad():
        out_a, out_b = (td.model_from_checkpoint(c, use_ema=False, amp="off")[0](x, t) for c in (a, b))
    torch.testing.assert_close(out_b, out_a, atol=1e-4, rtol=1e-3)
    rows = [read_loss_log(d / "checkpoints" / RUN / "loss_log.csv") for d in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]], "the loss log counts whole steps, whatever K"
    for ra, rb in zip(*rows):
        if ra.get("loss"):
            assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-4), ra["step"]
    bad = run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", "20", "--grad_accum", "3", cwd=two)
    assert bad.returncode == 2 and "--grad_accum must divide --batch_size 16" in bad.stderr


def test_max_minutes_stops_on_time_with_a_preview_and_a_save_and_resumes_to_the_uninterrupted_weights(
        cifar_dir, tmp_path):
    flags = [*TINY, "--dropout", "0.1", "--epochs", "4", "--val_size", "0", "--data_dir", cifar_dir]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert_ok(run_cli(*flags, cwd=one))
    cut = run_cli(*flags, "--max_minutes", "0.01", cwd=two)  # 0.6 s of a run of 20 steps
    assert_ok(cut)
    stopped = load_ckpt(two / "checkpoints" / RUN / "latest.pt")
    assert 0 < stopped["step"] < 20
    assert f"--max_minutes 0.01 reached at step {stopped['step']} of 20" in cut.stdout
    assert "--resume checkpoints" in cut.stdout
    epoch_in_progress = -(-stopped["step"] // STEPS_PER_EPOCH)  # the preview of the epoch it stopped in
    assert (two / "samples" / RUN / f"epoch_{epoch_in_progress:04d}.png").exists()
    again = run_cli("--run_name", RUN, "--resume", "latest", "--max_minutes", "0.01", cwd=two)
    assert again.returncode == 2 and "raise --max_minutes" in again.stderr
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--max_minutes", "100", cwd=two))
    a, b = load_ckpt(one / "checkpoints" / RUN / "latest.pt"), load_ckpt(two / "checkpoints" / RUN / "latest.pt")
    assert a["step"] == b["step"] == 20
    assert same_tensors(a["model"], b["model"]) and same_tensors(a["ema"], b["ema"])


def test_the_eta_of_a_max_minutes_run_is_the_time_it_has_left():
    meter = td.Meter(torch.device("cpu"), num_timesteps=20)
    meter.start(step=0, elapsed_before=50 * 60)  # 50 minutes done
    time.sleep(0.05)
    assert meter.eta(100, 10 ** 9, max_minutes=60) in ("0:09:59", "0:10:00")
    assert int(meter.eta(100, 10 ** 9).split(":")[0]) > 100, "without a time limit: the steps left"
    assert meter.eta(100, 101, max_minutes=60) == "0:00:00", "the steps run out first"


# --- 4. Non-finite losses and gradients ---------------------------------------------------------------

def tiny_training(fused):
    torch.manual_seed(0)
    model = td.UNet(td.Config(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                              attn_resolutions=(), dropout=0.0, emb_dim=16))
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3, fused_adamw=fused))
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "plain-adamw"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_step_is_skipped_and_leaves_weights_and_adam_state_untouched(fused, poison):
    model, optimizer, scaler = tiny_training(fused)
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 50, 1e-3, 0.2))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 50, (4,), generator=g)
    _, _, bad = td.train_step(model, diffusion, td.Batch(x, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    assert not bad
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: {n: s.clone() for n, s in v.items()} for k, v in optimizer.state_dict()["state"].items()}
    x_bad = x.clone()
    x_bad[1, 2, 3, 4] = poison
    _, losses, bad = td.train_step(model, diffusion, td.Batch(x_bad, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    assert bad and not torch.isfinite(losses).all()
    assert same_tensors(weights, model.state_dict())
    for k, v in optimizer.state_dict()["state"].items():
        assert same_tensors(adam[k], v), f"Adam state of parameter {k} moved"
    # and the next good step trains again
    _, _, bad = td.train_step(model, diffusion, td.Batch(x, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    assert not bad and not same_tensors(weights, model.state_dict())


def test_a_run_whose_steps_keep_failing_stops_with_the_last_good_weights_and_names_the_causes(cifar_dir, tmp_path):
    # An absurd learning rate makes the weights huge after one step; every later loss overflows.
    result = run_cli(*TINY, "--learning_rate", "1e30", "--warmup_steps", "0", "--max_bad_steps", "4",
                     "--sample_every", "0", "--epochs", "5", "--data_dir", cifar_dir, cwd=tmp_path)
    assert result.returncode == 1, describe(result)
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in line and "--learning_rate" in line and "--amp" in line and "resume with" in line
    run_dir = tmp_path / "checkpoints" / RUN
    ckpt = load_ckpt(run_dir / "latest.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), "the saved weights are the good ones"
    rows = [r for r in read_loss_log(run_dir / "loss_log.csv") if r.get("bad_steps")]
    assert sum(int(r["bad_steps"]) for r in rows) >= 4
    assert ckpt["step"] < 25, "it stopped early"


# --- 5. Safe loading: corrupt files name the checkpoint to use; weights-only .safetensors ----------------

def test_a_corrupt_latest_names_the_newest_checkpoint_that_loads(trained, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    data = (run_dir / "latest.pt").read_bytes()
    (run_dir / "latest.pt").unlink()  # a hard link: write a new, broken file rather than break epoch 2 too
    (run_dir / "latest.pt").write_bytes(data[:len(data) // 3])
    result = run_cli("--resume", run_dir / "latest.pt", "--epochs", "3", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, describe(result)
    assert "latest.pt" in result.stderr and f"resume from {run_dir / 'ddpm_ts20_epoch0002.pt'} instead" in result.stderr


def test_safetensors_export_holds_only_weights_and_samples_the_same_images(trained, tmp_path):
    pytest.importorskip("safetensors")
    exported = tmp_path / "model.safetensors"
    result = run_cli("--mode", "sample", "--checkpoint", trained.run_dir / "latest.pt", "--export_safetensors",
                     exported, cwd=tmp_path)
    assert_ok(result)
    assert exported.read_bytes()[8:9] == b"{", "a safetensors file: a length, then a JSON header, then tensors"
    images = []
    for source in (trained.run_dir / "latest.pt", exported):
        out = tmp_path / source.suffix.strip(".")
        assert_ok(run_cli("--mode", "sample", "--checkpoint", source, "--num_samples", "3", "--sampling_steps", "4",
                          "--out", out, cwd=tmp_path))
        (npz,) = out.glob("*.npz")
        images.append(np.load(npz)["arr_0"])
    assert np.array_equal(*images)


# --- 6. Locks, full disks ---------------------------------------------------------------------------------

def test_a_second_run_into_a_busy_run_folder_is_refused_and_a_stale_lock_is_taken_over(cifar_dir, tmp_path):
    process = start(*LONG, "--data_dir", cifar_dir, cwd=tmp_path)
    run_dir = tmp_path / "checkpoints" / RUN
    wait_for_rows(run_dir / "loss_log.csv", 1, process)
    assert json.loads((run_dir / ".lock").read_text())["pid"] == process.pid
    fresh = run_cli(*LONG, "--data_dir", cifar_dir, cwd=tmp_path)
    assert fresh.returncode == 2 and f"pid {process.pid}" in fresh.stderr, describe(fresh)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / ".lock").exists(), "kill -9 leaves the lock behind"
    resumed = run_cli("--run_name", RUN, "--resume", "latest", "--max_steps", "12", cwd=tmp_path) \
        if (run_dir / "latest.pt").exists() else run_cli(*LONG, "--max_steps", "12", "--data_dir", cifar_dir,
                                                           cwd=tmp_path)
    assert_ok(resumed)
    assert "stale lock" in resumed.stdout
    assert not (run_dir / ".lock").exists()


def test_a_full_disk_skips_the_save_with_a_warning_and_keeps_the_previous_checkpoint(trained, tmp_path,
                                                                                     monkeypatch, capsys):
    import shutil
    run_dir = tmp_path / "checkpoints" / RUN
    shutil.copytree(trained.run_dir, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.pt")}
    ckpt = td.read_checkpoint(run_dir / "latest.pt")
    cfg = td.dataclasses.replace(td.config_from_dict(ckpt["config"]), checkpoint_dir=str(tmp_path / "checkpoints"),
                                 samples_dir=str(tmp_path / "samples"), epochs=3, sample_every=0)
    real = shutil.disk_usage
    monkeypatch.setattr(td.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    td.train(cfg, resume_from=ckpt)
    err = capsys.readouterr().err
    assert "warning: not saving ddpm_ts20_epoch0003.pt" in err and "MB free" in err
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.pt")} == before


def test_a_run_saved_with_plain_adamw_resumes_with_the_fused_kernel(cifar_dir, tmp_path):
    # load_state_dict would take the kernel from the file; the resumed run must keep the one it built.
    flags = [*TINY, "--sample_every", "0", "--data_dir", cifar_dir]
    assert_ok(run_cli(*flags, "--fused_adamw", "false", "--max_steps", "3", cwd=tmp_path))
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--fused_adamw", "true", "--max_steps", "6",
                      cwd=tmp_path))
    ckpt = load_ckpt(tmp_path / "checkpoints" / RUN / "latest.pt")
    assert ckpt["step"] == 6 and ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
