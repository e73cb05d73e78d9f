"""train_ddpm.py end to end: the real command line in a subprocess, on tiny data the tests write.

Every run happens in a temporary folder (cwd), so checkpoints/ and samples/ land there. One small
two-epoch training run (module fixture) is shared by the checkpoint, resume and sampling tests;
tests that change a run work on a copy of it.
"""

import csv
import hashlib
import importlib.util
import json
import os
import pickle
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_ddpm.py"

RUN = "quick_test_ts20"                      # default run name: <preset>_ts<timesteps>
IMAGES_PER_BATCH_FILE = 16                   # 5 CIFAR batch files -> 80 images
STEPS_PER_EPOCH = 5 * IMAGES_PER_BATCH_FILE // 16
# A tiny model and chain. The betas are the script's own advice for T=20, so x_T is pure noise and
# no schedule warning lands on stderr (the error tests want stderr to hold the error alone);
# warmup_steps 2 puts most steps on the cosine-restarts schedule, whose state a resume must restore.
TINY = ["--preset", "quick_test", "--train_subset", "0", "--batch_size", "16", "--log_every", "2",
        "--preview_steps", "5", "--num_preview", "4", "--base_channels", "16", "--timesteps", "20",
        "--beta_start", "0.005", "--beta_end", "0.999", "--warmup_steps", "2"]
LOSS_LOG_HEADER = ("step,epoch,loss,loss_q0,loss_q1,loss_q2,loss_q3,lr,grad_norm,bad_steps,images_per_s,elapsed_s,"
                   "session,val_loss,fid,val_loss_t50,val_loss_t250,val_loss_t500,val_loss_t750,psnr_t50,psnr_t250,"
                   "psnr_t500,psnr_t750")
CHECKPOINT_KEYS = {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "config", "loss_log_step"}
# No run may reach the internet: a refused proxy makes a CIFAR-10 download fail at once.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}


def run_cli(*args, cwd, timeout=300, stdin=subprocess.DEVNULL):
    env = {**os.environ, **OFFLINE}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, stdin=stdin,
                          capture_output=True, text=True, timeout=timeout)


def describe(result):
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def assert_ok(result):
    assert result.returncode == 0, describe(result)


def assert_one_line_error(result, *fragments):
    """Exit code 2 and exactly one non-empty line on stderr, without a traceback, naming fragments."""
    assert result.returncode == 2, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr, got {result.stderr!r}"
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root):
    """Every file and folder under root, with size, mtime and content hash of each file."""
    state = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            state[rel] = "dir"
        else:
            st = p.stat()
            state[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_loss_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_valid_png(path, min_size=(1, 1)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        return img.size


def assert_same_tensors(a, b, what):
    """Two (nested) state dicts hold exactly equal tensors and equal other values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{what} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def copy_run(trained, dest):
    """A copy of the trained folder (checkpoints/ and samples/) to mutate."""
    for sub in ("checkpoints", "samples"):
        shutil.copytree(trained.root / sub, dest / sub)
    return dest / "checkpoints" / RUN


# --- Data the tests make ---------------------------------------------------------------------------

def write_cifar_pickles(data_dir, per_batch=IMAGES_PER_BATCH_FILE, seed=0):
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    return data_dir


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_cifar_pickles(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_dir):
    """Two epochs of the tiny model on the 80 pickled images, in a folder of its own."""
    root = tmp_path_factory.mktemp("trained")
    result = run_cli(*TINY, "--epochs", "2", "--data_dir", cifar_dir, cwd=root)
    assert_ok(result)
    return SimpleNamespace(root=root, result=result, run_dir=root / "checkpoints" / RUN,
                           samples=root / "samples" / RUN)


# --- 1. Training -------------------------------------------------------------------------------------

def test_two_epochs_on_cifar_pickles_write_checkpoints_config_log_and_previews(trained):
    assert sorted(p.name for p in trained.run_dir.iterdir()) == sorted([
        "ddpm_ts20_epoch0001.pt", "ddpm_ts20_epoch0002.pt", "latest.pt", "config.json", "loss_log.csv"])
    assert sorted(p.name for p in trained.samples.iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    for name in ("epoch_0001.png", "epoch_0002.png"):
        assert_valid_png(trained.samples / name, min_size=(4 * 32, 32))  # a grid of num_preview=4


def test_a_finished_run_prints_how_to_plot_and_sample_it(trained):
    # without power-EMA profiles the plain command: an autoguide's EMA would need them (test_autoguidance)
    assert f"plot the loss: python plot_loss.py checkpoints/{RUN}\n" in trained.result.stdout
    assert (f"sample it: python train_ddpm.py --mode sample --checkpoint checkpoints/{RUN}/ddpm_ts20_epoch0002.pt\n"
            in trained.result.stdout), trained.result.stdout


def test_the_default_run_name_is_the_preset_and_timesteps(trained):
    assert trained.run_dir.name == "quick_test_ts20"
    assert re.search(r"^\s*run_name\s+quick_test_ts20\s*$", trained.result.stdout, re.M), trained.result.stdout
    assert json.loads((trained.run_dir / "config.json").read_text())["run_name"] == "quick_test_ts20"


def test_a_checkpoint_holds_the_whole_training_state_and_matches_config_json(trained):
    ckpt = load_ckpt(trained.run_dir / "ddpm_ts20_epoch0002.pt")
    assert CHECKPOINT_KEYS <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * STEPS_PER_EPOCH
    assert ckpt["loss_log_step"] == ckpt["step"]
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert "rng" not in ckpt, "every draw is derived from (seed, step): no RNG state to carry"
    assert ckpt["optimizer"]["state"], "the optimizer state (Adam moments) is saved"
    # config.json is the checkpoint's config (JSON turns tuples into lists)
    saved = json.loads((trained.run_dir / "config.json").read_text())
    assert saved == json.loads(json.dumps(ckpt["config"]))
    assert saved["preset"] == "quick_test" and saved["timesteps"] == 20 and saved["base_channels"] == 16
    assert saved["num_res_blocks"] == 1, "values not given as flags come from the preset"
    first = load_ckpt(trained.run_dir / "ddpm_ts20_epoch0001.pt")
    assert first["epoch"] == 1 and first["step"] == STEPS_PER_EPOCH


def test_latest_pt_is_the_newest_epoch_checkpoint(trained):
    latest = (trained.run_dir / "latest.pt").read_bytes()
    assert latest == (trained.run_dir / "ddpm_ts20_epoch0002.pt").read_bytes()


def test_the_loss_log_has_the_documented_header_and_a_row_every_log_every_steps(trained):
    text = (trained.run_dir / "loss_log.csv").read_text()
    assert text.splitlines()[0] == LOSS_LOG_HEADER
    rows = read_loss_log(trained.run_dir / "loss_log.csv")
    steps = [int(r["step"]) for r in rows]
    final = 2 * STEPS_PER_EPOCH
    assert steps == sorted(set(steps)), "steps increase and never repeat"
    assert all(s % 2 == 0 for s in steps[:-1]) and (steps[-1] % 2 == 0 or steps[-1] == final)
    assert steps == [2, 4, 6, 8, 10]
    for r in rows:
        assert r["session"] == "0"
        assert float(r["epoch"]) == pytest.approx(int(r["step"]) / STEPS_PER_EPOCH)
        assert 0 < float(r["loss"]) < 10 and float(r["lr"]) > 0 and float(r["grad_norm"]) >= 0


# --- 2. Resume ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed(tmp_path_factory, trained, cifar_dir):
    """A copy of the trained run resumed with --resume latest to epoch 3. Before resuming, a row of
    step 12 is appended to its loss log, as a run killed in epoch 3 before its checkpoint leaves it."""
    root = tmp_path_factory.mktemp("resumed")
    run_dir = copy_run(trained, root)
    log = run_dir / "loss_log.csv"
    old_log = log.read_bytes()
    old_checkpoints = {n: (run_dir / n).read_bytes() for n in ("ddpm_ts20_epoch0001.pt", "ddpm_ts20_epoch0002.pt")}
    with open(log, "a", newline="") as f:
        csv.writer(f).writerow([12, "2.4000", "9.999999", "0.001", "1.0", "100.0", "9.9", 0])
    result = run_cli("--run_name", RUN, "--resume", "latest", "--epochs", "3", "--data_dir", cifar_dir, cwd=root)
    assert_ok(result)
    return SimpleNamespace(root=root, run_dir=run_dir, result=result, old_log=old_log,
                           old_checkpoints=old_checkpoints)


def test_resume_latest_continues_the_step_count_into_epoch_three(resumed):
    ckpt = load_ckpt(resumed.run_dir / "ddpm_ts20_epoch0003.pt")
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 * STEPS_PER_EPOCH
    assert ckpt["session"] == 1
    assert (resumed.run_dir / "latest.pt").read_bytes() == (resumed.run_dir / "ddpm_ts20_epoch0003.pt").read_bytes()
    for name, content in resumed.old_checkpoints.items():
        assert (resumed.run_dir / name).read_bytes() == content, f"{name} was rewritten"
    assert "step 10, epoch 2" in resumed.result.stdout
    assert_valid_png(resumed.root / "samples" / RUN / "epoch_0003.png")
    assert json.loads((resumed.run_dir / "config.json").read_text())["epochs"] == 3


def test_the_resumed_loss_log_keeps_old_rows_byte_for_byte_and_adds_session_one_rows(resumed):
    data = (resumed.run_dir / "loss_log.csv").read_bytes()
    assert data.startswith(resumed.old_log), "rows up to the checkpoint are kept byte for byte"
    rows = read_loss_log(resumed.run_dir / "loss_log.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 15], "no duplicated steps; the stale row of step 12 is replaced"
    assert [r["session"] for r in rows] == ["0"] * 5 + ["1"] * 3
    assert all(r["loss"] != "9.999999" for r in rows)


def test_resume_drops_a_loss_log_row_torn_by_a_crash_instead_of_keeping_it_as_a_bogus_row(
        trained, cifar_dir, tmp_path):
    # A run killed while writing the row of step 12 leaves "1" (its first byte) at the end of the log.
    run_dir = copy_run(trained, tmp_path)
    old_log = (run_dir / "loss_log.csv").read_bytes()
    (run_dir / "loss_log.csv").write_bytes(old_log + b"1")
    assert_ok(run_cli("--run_name", RUN, "--resume", "latest", "--epochs", "3", "--data_dir", cifar_dir,
                      cwd=tmp_path))
    rows = read_loss_log(run_dir / "loss_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert all(r["loss"] for r in rows)


def test_resume_from_an_explicit_checkpoint_path_reaches_the_same_weights_as_resume_latest(
        trained, resumed, cifar_dir, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    result = run_cli("--resume", f"checkpoints/{RUN}/ddpm_ts20_epoch0002.pt", "--epochs", "3",
                     "--data_dir", cifar_dir, cwd=tmp_path)
    assert_ok(result)
    assert "ddpm_ts20_epoch0002.pt (step 10, epoch 2)" in result.stdout
    ckpt = load_ckpt(run_dir / "ddpm_ts20_epoch0003.pt")
    assert ckpt["step"] == 3 * STEPS_PER_EPOCH
    other = load_ckpt(resumed.run_dir / "ddpm_ts20_epoch0003.pt")
    assert_same_tensors(ckpt["model"], other["model"], "model")


@pytest.mark.parametrize("flag, value", [("--timesteps", "30"), ("--base_channels", "32")])
def test_resume_refuses_a_flag_that_contradicts_the_checkpoint_and_changes_nothing(
        trained, cifar_dir, tmp_path, flag, value):
    copy_run(trained, tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("--run_name", RUN, "--resume", "latest", "--epochs", "3", "--data_dir", cifar_dir,
                     flag, value, cwd=tmp_path)
    assert_one_line_error(result, flag)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("first_leg", [
    pytest.param(["--epochs", "1"], id="resume-at-an-epoch-boundary"),
    pytest.param(["--epochs", "2", "--max_steps", "7"], id="resume-in-the-middle-of-an-epoch"),
])
def test_training_in_two_sessions_gives_exactly_the_weights_of_one_session(trained, cifar_dir, tmp_path, first_leg):
    # quick_test has dropout 0; the data order is a function of seed and epoch and the RNG is saved
    assert_ok(run_cli(*TINY, "--dropout", "0", *first_leg, "--data_dir", cifar_dir, cwd=tmp_path))
    assert_ok(run_cli(*TINY, "--dropout", "0", "--run_name", RUN, "--resume", "latest", "--epochs", "2",
                      "--max_steps", "0", "--data_dir", cifar_dir, cwd=tmp_path))
    two_sessions = load_ckpt(tmp_path / "checkpoints" / RUN / "ddpm_ts20_epoch0002.pt")
    one_session = load_ckpt(trained.run_dir / "ddpm_ts20_epoch0002.pt")
    assert two_sessions["step"] == one_session["step"] == 2 * STEPS_PER_EPOCH
    for key in ("model", "ema", "optimizer", "scheduler"):
        assert_same_tensors(two_sessions[key], one_session[key], key)
    # steps 9-10 were logged over the same interval in both runs: same losses and gradient norms
    last = {k: read_loss_log(d / "loss_log.csv")[-1] for k, d in
            (("two", tmp_path / "checkpoints" / RUN), ("one", trained.run_dir))}
    assert (last["two"]["step"], last["two"]["loss"], last["two"]["grad_norm"]) == \
           (last["one"]["step"], last["one"]["loss"], last["one"]["grad_norm"])


# --- 3. A new run never overwrites an old one --------------------------------------------------------

def test_a_new_run_in_a_folder_with_checkpoints_is_refused_and_nothing_is_overwritten(trained, cifar_dir, tmp_path):
    copy_run(trained, tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*TINY, "--epochs", "2", "--data_dir", cifar_dir, cwd=tmp_path)
    assert_one_line_error(result, "--resume")
    assert snapshot(tmp_path) == before


# --- 4. Sampling -------------------------------------------------------------------------------------

def check_sample_outputs(out_dir, stem_prefix, n=6):
    """The grid, n individual PNGs and an .npz of uint8 (n, 32, 32, 3) that the PNGs match;
    returns the stem."""
    npzs = sorted(out_dir.glob(f"{stem_prefix}*.npz"))
    assert len(npzs) == 1, sorted(p.name for p in out_dir.iterdir())
    stem = npzs[0].stem
    with np.load(npzs[0]) as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (n, 32, 32, 3)
    assert images.std() > 0, "not a constant image"
    pngs = sorted((out_dir / stem).glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(n)]
    for i, p in enumerate(pngs):
        assert_valid_png(p)
        with Image.open(p) as img:
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), images[i])
    assert_valid_png(out_dir / f"{stem}_grid.png", min_size=(n * 32, 32))
    return stem


@pytest.mark.parametrize("sampler_args, prefix, checkpoint", [
    pytest.param(["--sampler", "ddpm", "--sampling_steps", "10"], "samples_ddpm10", "run folder", id="ddpm-from-run-folder"),
    pytest.param(["--sampler", "ddim", "--sampling_steps", "5", "--eta", "0"], "samples_ddim5", "pt file", id="ddim-from-pt-file"),
])
def test_sampling_writes_a_grid_individual_pngs_and_an_npz(trained, tmp_path, sampler_args, prefix, checkpoint):
    before = snapshot(trained.root)
    target = trained.run_dir if checkpoint == "run folder" else trained.run_dir / "ddpm_ts20_epoch0001.pt"
    result = run_cli("--mode", "sample", "--checkpoint", target, *sampler_args,
                     "--num_samples", "6", "--batch_size", "4", cwd=tmp_path)
    assert_ok(result)
    expected = "latest.pt" if checkpoint == "run folder" else "ddpm_ts20_epoch0001.pt"
    assert expected in result.stdout
    out = tmp_path / "samples" / RUN  # default: <samples_dir>/<run>/
    check_sample_outputs(out, prefix)
    assert snapshot(trained.root) == before, "sampling leaves the run untouched"


def test_a_second_identical_sample_call_keeps_the_first_outputs_and_out_is_honoured(trained, tmp_path):
    args = ["--mode", "sample", "--checkpoint", trained.run_dir / "latest.pt", "--sampler", "ddim",
            "--sampling_steps", "5", "--eta", "0", "--num_samples", "6", "--batch_size", "4", "--out", "my_out"]
    assert_ok(run_cli(*args, cwd=tmp_path))
    out = tmp_path / "my_out"
    first = check_sample_outputs(out, "samples_ddim5")
    first_files = snapshot(out)
    assert_ok(run_cli(*args, cwd=tmp_path))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in first_files} == first_files, "first outputs untouched"
    new_npz = [k for k in after if k.endswith(".npz") and k not in first_files]
    assert len(new_npz) == 1
    second = check_sample_outputs(out, Path(new_npz[0]).stem)
    assert second != first
    assert not (tmp_path / "samples").exists(), "--out replaces the default samples/<run>/"
    # same seed, deterministic DDIM: the same images
    with np.load(out / f"{first}.npz") as a, np.load(out / f"{second}.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


# --- 5. The interactive menu on a terminal --------------------------------------------------------

def run_on_terminal(args, cwd, respond, timeout=240):
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; answer each prompt (a line
    ending in ']: ') with respond(prompt, transcript). Returns (exit code, transcript, prompts)."""
    master, slave = pty.openpty()
    env = {**os.environ, **OFFLINE, "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True, start_new_session=True)
    os.close(slave)
    transcript, consumed, prompts = bytearray(), 0, []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"no exit within {timeout}s; transcript:\n{transcript.decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            transcript += chunk
            pending = transcript[consumed:].decode(errors="replace")
            if pending.endswith("]: "):
                prompt = pending.replace("\r", "").rsplit("\n", 1)[-1]
                prompts.append(prompt)
                if len(prompts) > 40:
                    pytest.fail(f"too many prompts:\n{transcript.decode(errors='replace')[-3000:]}")
                os.write(master, respond(prompt, transcript.decode(errors="replace")).encode() + b"\n")
                consumed = len(transcript)
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, transcript.decode(errors="replace").replace("\r\n", "\n"), prompts


def prompt_field(prompt):
    return "preset" if prompt.startswith("Choose a preset") else prompt.split()[0]


def test_the_menu_on_a_terminal_asks_only_what_the_flags_leave_open_and_reasks_bad_values(cifar_dir, tmp_path):
    lr_answers = iter(["abc", "0.0005"])

    def respond(prompt, transcript):
        field = prompt_field(prompt)
        if field == "preset":
            return re.search(r"^\s*(\d+)\.\s+quick_test\s", transcript, re.M).group(1)
        if field == "learning_rate":
            return next(lr_answers)
        return ""  # Enter keeps the value in brackets

    code, transcript, prompts = run_on_terminal(
        ["--mode", "train", "--data_dir", cifar_dir, "--train_subset", "0", "--epochs", "1", "--batch_size", "16",
         "--base_channels", "16", "--timesteps", "20", "--preview_steps", "5"], tmp_path, respond)
    assert code == 0, transcript[-3000:]
    fields = [prompt_field(p) for p in prompts]
    # numbered presets, then the questions
    assert re.search(r"^\s*\d+\.\s+quick_test\s", transcript, re.M) and re.search(r"^\s*\d+\.\s+cifar10\s", transcript, re.M)
    assert fields[0] == "preset"
    # the machine decides the Enter choice (no GPU: the CPU-hour preset), and every preset says its time here
    default = "cifar10_optimized" if torch.cuda.is_available() else "cpu_hour"
    assert re.search(rf"Enter = \d+ {default}\]", prompts[0]), prompts[0]
    preset_lines = re.findall(r"^\s*\d+\.\s+\w+\s.*$", transcript, re.M)
    assert len(preset_lines) == len(importlib.import_module("train_ddpm").PRESETS)
    assert all(re.search(r"; about \d+ (minute|hour|day)s? here", line) for line in preset_lines), preset_lines
    assert "GFLOP/s" in transcript
    assert fields[1:3] == ["learning_rate", "learning_rate"], "a bad value is asked again"
    assert "[0.001]" in prompts[1], "the default shown is the chosen preset's"
    between = transcript.split(prompts[1], 1)[1].split(prompts[2], 1)[0]
    assert "try again" in between
    assert not {"epochs", "batch_size", "timesteps", "base_channels"} & set(fields), fields
    assert "schedule_type" in fields
    # the resolved config, printed and saved
    assert re.search(r"^\s*preset\s+quick_test\s*$", transcript, re.M)
    assert re.search(r"^\s*learning_rate\s+0.0005\s*$", transcript, re.M)
    saved = json.loads((tmp_path / "checkpoints" / RUN / "config.json").read_text())
    assert saved["preset"] == "quick_test" and saved["learning_rate"] == 0.0005
    assert (saved["epochs"], saved["batch_size"], saved["timesteps"], saved["base_channels"]) == (1, 16, 20, 16)
    assert saved["schedule_type"] == "linear" and saved["num_res_blocks"] == 1  # Enter / the preset
    assert (tmp_path / "checkpoints" / RUN / "ddpm_ts20_epoch0001.pt").is_file()


# --- 6. No terminal: the default preset, no questions --------------------------------------------

def test_without_a_terminal_or_preset_the_run_uses_cifar10_optimized_without_asking(tmp_path):
    (tmp_path / "empty").mkdir()
    before = snapshot(tmp_path)
    result = run_cli("--dataset", "folder", "--data_dir", "empty", cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert re.search(r"^\s*preset\s+cifar10_optimized\s*$", result.stdout, re.M), describe(result)
    assert re.search(r"^\s*run_name\s+cifar10_optimized_ts1000\s*$", result.stdout, re.M)
    assert "Choose a preset" not in result.stdout + result.stderr
    assert_one_line_error(result, "no .png/.jpg/.jpeg images")  # then the empty folder stops it
    assert snapshot(tmp_path) == before


# --- Image folders -------------------------------------------------------------------------------------

def test_training_on_a_nested_image_folder_of_mixed_formats_modes_and_shapes_works(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"

    def save(rel, h, w, mode):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
        shape = (h, w) if channels is None else (h, w, channels)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)

    save("a.png", 40, 40, "RGB")
    save("cats/wide_gray.jpg", 20, 64, "L")
    save("cats/deep/tall_rgba.png", 70, 30, "RGBA")
    save("dogs/PHOTO.JPEG", 33, 47, "RGB")
    save("dogs/tiny.jpg", 12, 12, "RGB")
    save("dogs/deep/deeper/gray.png", 100, 50, "L")
    Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).convert("P").save(root / "dogs" / "palette.png")
    (root / "notes.txt").write_text("not an image")
    n_images = 7
    result = run_cli("--preset", "quick_test", "--dataset", "folder", "--data_dir", root, "--image_size", "16",
                     "--batch_size", "4", "--epochs", "1", "--base_channels", "16", "--timesteps", "20",
                     "--beta_start", "0.005", "--beta_end", "0.999", "--preview_steps", "5", "--num_preview", "2",
                     "--num_workers", "2", cwd=tmp_path)
    assert_ok(result)
    assert f"{n_images} training images" in result.stdout
    ckpt = load_ckpt(tmp_path / "checkpoints" / RUN / "ddpm_ts20_epoch0001.pt")
    assert ckpt["num_images"] == n_images and ckpt["config"]["image_size"] == 16
    assert_valid_png(tmp_path / "samples" / RUN / "epoch_0001.png", min_size=(2 * 16, 16))


# --- 7. Bad input: one line, exit 2, nothing touched ------------------------------------------------

def _real_checkpoint(trained, tmp_path):
    shutil.copy(trained.run_dir / "ddpm_ts20_epoch0002.pt", tmp_path / "real.pt")
    return "real.pt"


def _truncated_checkpoint(trained, tmp_path):
    data = (trained.run_dir / "ddpm_ts20_epoch0002.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    return "truncated.pt"


def _garbage_checkpoint(trained, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return "garbage.pt"


def _empty_dir(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    return "empty"


def _one_image(trained, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "x.png")
    return "imgs"


def _small_cifar(trained, tmp_path):
    write_cifar_pickles(tmp_path / "cifar")  # 80 images
    return "cifar"


def _a_file(trained, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    return "afile"


def _real_checkpoint_and_a_file(trained, tmp_path):
    _real_checkpoint(trained, tmp_path)
    return _a_file(trained, tmp_path)


def _exported_safetensors(trained, tmp_path):
    pytest.importorskip("safetensors")
    assert_ok(run_cli("--mode", "sample", "--checkpoint", trained.run_dir / "latest.pt", "--export_safetensors",
                      tmp_path / "weights.safetensors", cwd=tmp_path))
    return "weights.safetensors"


def _garbage_safetensors(trained, tmp_path):
    pytest.importorskip("safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return "garbage.safetensors"


def _run_locked_by_a_live_process(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    # The lock of a process that is alive (this test's own), as a run in progress leaves it.
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(),
                                               "started": "earlier"}))
    return f"checkpoints/{RUN}"


BAD_INPUTS = [
    # id, setup (returns a path the arguments use as {p}), arguments, fragments of the message
    ("unknown-preset", None, ["--preset", "nope"],
     ["nope", "quick_test", "cifar10_optimized", "ddpm_paper", "best_quality", "fastest", "low_memory", "cpu_hour"]),
    ("negative-learning-rate", None, ["--preset", "quick_test", "--learning_rate", "-0.001"], ["--learning_rate"]),
    ("beta-start-above-beta-end", None, ["--preset", "quick_test", "--beta_start", "0.2", "--beta_end", "0.1"],
     ["--beta_start", "--beta_end"]),
    ("beta-start-equal-to-beta-end", None, ["--preset", "quick_test", "--beta_start", "0.1", "--beta_end", "0.1"],
     ["--beta_start"]),
    ("sample-without-checkpoint-flag", None, ["--mode", "sample"], ["--checkpoint"]),
    ("sample-missing-checkpoint", None, ["--mode", "sample", "--checkpoint", "nothing_here.pt"], ["nothing_here.pt"]),
    ("sample-run-folder-without-checkpoints", _empty_dir, ["--mode", "sample", "--checkpoint", "{p}"], ["empty"]),
    ("sample-garbage-checkpoint", _garbage_checkpoint, ["--mode", "sample", "--checkpoint", "{p}"], ["garbage.pt"]),
    ("sample-truncated-checkpoint", _truncated_checkpoint, ["--mode", "sample", "--checkpoint", "{p}"],
     ["truncated.pt"]),
    ("resume-garbage-checkpoint", _garbage_checkpoint, ["--resume", "{p}", "--epochs", "3"], ["garbage.pt"]),
    ("resume-truncated-checkpoint", _truncated_checkpoint, ["--resume", "{p}", "--epochs", "3"], ["truncated.pt"]),
    ("resume-missing-checkpoint", None, ["--resume", "nothing_here.pt"], ["nothing_here.pt"]),
    ("cifar10-offline-without-data", _empty_dir, ["--preset", "quick_test", "--dataset", "cifar10", "--data_dir", "{p}"],
     ["cifar-10-python.tar.gz", "https://", "empty", "cifar-10-batches-py"]),
    ("sampling-steps-above-timesteps", _real_checkpoint,
     ["--mode", "sample", "--checkpoint", "{p}", "--sampling_steps", "21"], ["--sampling_steps", "20"]),
    ("sample-zero-samples", _real_checkpoint, ["--mode", "sample", "--checkpoint", "{p}", "--num_samples", "0"],
     ["--num_samples"]),
    ("image-size-not-a-multiple-of-the-levels", _one_image,
     ["--preset", "quick_test", "--dataset", "folder", "--data_dir", "{p}", "--image_size", "30"], ["--image_size"]),
    ("empty-image-folder", _empty_dir, ["--preset", "quick_test", "--dataset", "folder", "--data_dir", "{p}"],
     ["no .png/.jpg/.jpeg images", "empty"]),
    ("image-folder-that-does-not-exist", None,
     ["--preset", "quick_test", "--dataset", "folder", "--data_dir", "no_such_folder"], ["no_such_folder"]),
    ("preview-steps-above-timesteps", None, ["--preset", "quick_test", "--timesteps", "20", "--preview_steps", "50"],
     ["--preview_steps"]),
    ("zero-epochs", None, ["--preset", "quick_test", "--epochs", "0"], ["--epochs"]),
    ("negative-max-minutes", None, ["--preset", "quick_test", "--max_minutes", "-1"], ["--max_minutes"]),
    ("channel-mults-not-integers", None, ["--preset", "quick_test", "--channel_mults", "1,x"], ["--channel_mults"]),
    ("one-timestep", None, ["--preset", "quick_test", "--timesteps", "1"], ["--timesteps"]),
    ("beta-end-of-one", None, ["--preset", "quick_test", "--beta_end", "1.0"], ["--beta_end"]),
    ("zero-batch-size", None, ["--preset", "quick_test", "--batch_size", "0"], ["--batch_size"]),
    ("negative-seed", None, ["--preset", "quick_test", "--seed", "-1"], ["--seed"]),
    ("dropout-of-one", None, ["--preset", "quick_test", "--dropout", "1"], ["--dropout"]),
    ("negative-save-every-steps", None, ["--preset", "quick_test", "--save_every_steps", "-5"], ["--save_every_steps"]),
    ("zero-max-bad-steps", None, ["--preset", "quick_test", "--max_bad_steps", "0"], ["--max_bad_steps"]),
    ("unknown-amp", None, ["--preset", "quick_test", "--amp", "fp8"], ["--amp"]),
    ("checkpoint-dir-inside-a-file", _a_file, ["--preset", "quick_test", "--checkpoint_dir", "{p}/runs"],
     ["--checkpoint_dir", "is a file"]),
    ("sample-out-inside-a-file", _real_checkpoint_and_a_file,
     ["--mode", "sample", "--checkpoint", "real.pt", "--out", "{p}/out"], ["--out", "is a file"]),
    ("sample-negative-eta", _real_checkpoint, ["--mode", "sample", "--checkpoint", "{p}", "--eta", "-1"], ["--eta"]),
    ("export-safetensors-wrong-suffix", _real_checkpoint,
     ["--mode", "sample", "--checkpoint", "{p}", "--export_safetensors", "weights.pt"], [".safetensors"]),
    ("resume-from-weights-only-safetensors", _exported_safetensors, ["--resume", "{p}", "--epochs", "3"],
     ["sampling weights only"]),
    ("sample-corrupt-safetensors", _garbage_safetensors, ["--mode", "sample", "--checkpoint", "{p}"],
     ["garbage.safetensors"]),
    ("resume-a-run-another-process-is-writing", _run_locked_by_a_live_process,
     ["--resume", "{p}/latest.pt", "--epochs", "3"], ["in use by another training process", f"pid {os.getpid()}"]),
    ("num-gpus-zero", None, ["--preset", "quick_test", "--num_gpus", "0"], ["--num_gpus"]),
    ("batch-larger-than-the-training-set", _small_cifar,
     ["--preset", "quick_test", "--train_subset", "0", "--data_dir", "{p}", "--batch_size", "100"],
     ["--batch_size 100", "80 training images"]),
]


@pytest.mark.parametrize("setup, args, fragments", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_touches_no_file(trained, tmp_path, setup, args, fragments):
    p = setup(trained, tmp_path) if setup else None
    args = [a.format(p=p) for a in args]
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert snapshot(tmp_path) == before


# --- 8. A malicious checkpoint is never executed ------------------------------------------------------

class _RunsACommand:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil_checkpoint(path, marker):
    torch.save({"model": _RunsACommand(f"touch {marker}"), "config": {}}, path)


def test_the_evil_checkpoint_really_runs_code_when_unpickled_unsafely(tmp_path):
    # The control: the file the next tests use is truly hostile.
    marker = tmp_path / "control_marker"
    write_evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def evil_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    marker = root / "PWNED"
    write_evil_checkpoint(root / "evil.pt", marker)
    before = snapshot(root)
    results = {"sample": run_cli("--mode", "sample", "--checkpoint", "evil.pt", cwd=root),
               "resume": run_cli("--resume", "evil.pt", "--epochs", "3", cwd=root)}
    return SimpleNamespace(root=root, marker=marker, before=before, results=results)


@pytest.mark.parametrize("mode", ["sample", "resume"])
def test_a_malicious_checkpoint_is_refused_without_running_its_code(evil_runs, mode):
    assert_one_line_error(evil_runs.results[mode], "evil.pt")
    assert not evil_runs.marker.exists(), "the pickled os.system ran"
    assert snapshot(evil_runs.root) == evil_runs.before


def test_the_error_for_a_malicious_checkpoint_names_the_blocked_call_and_does_not_advise_weights_only_false(evil_runs):
    # The one-line message should say why the file was refused (torch names the blocked global
    # posix.system) and must not read as advice to load a hostile file with weights_only=False.
    line = evil_runs.results["sample"].stderr.strip()
    assert "system" in line, line
    assert "set to `False`" not in line, line


# --- 10. Options: keep_last, EMA weights, aliases, the config as flags --------------------------------

def test_keep_last_prunes_older_epoch_checkpoints_and_latest_stays_loadable(cifar_dir, tmp_path):
    assert_ok(run_cli(*TINY, "--epochs", "3", "--keep_last", "1", "--sample_every", "0",
                      "--data_dir", cifar_dir, cwd=tmp_path))
    run_dir = tmp_path / "checkpoints" / RUN
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["ddpm_ts20_epoch0003.pt", "latest.pt"]
    assert load_ckpt(run_dir / "latest.pt")["step"] == 3 * STEPS_PER_EPOCH
    assert not (tmp_path / "samples" / RUN).exists() or not list((tmp_path / "samples" / RUN).iterdir())


def sample_npz(trained, tmp_path, *extra):
    out = tmp_path / "_".join(extra).replace("-", "") if extra else tmp_path / "default"
    assert_ok(run_cli("--mode", "sample", "--checkpoint", trained.run_dir, "--sampling_steps", "5",
                      "--num_samples", "4", "--seed", "3", "--out", out, *extra, cwd=tmp_path))
    (npz,) = out.glob("*.npz")
    return np.load(npz)["arr_0"]


def test_cli_samples_come_from_the_ema_weights_unless_no_ema(trained, tmp_path):
    import train_ddpm
    ema_images = sample_npz(trained, tmp_path)
    raw_images = sample_npz(trained, tmp_path, "--no_ema")
    for use_ema, images in ((True, ema_images), (False, raw_images)):
        model, diffusion, cfg = train_ddpm.load_checkpoint(trained.run_dir / "latest.pt", use_ema=use_ema)
        expected = train_ddpm.generate_samples(model, diffusion, train_ddpm.SamplingSpec("ddpm", 5), (4, 3, 32, 32), 3)
        assert np.array_equal(images, expected), f"use_ema={use_ema}"
    assert not np.array_equal(ema_images, raw_images)


def test_var_type_fixedsmall_changes_ddpm_samples(trained, tmp_path):
    large = sample_npz(trained, tmp_path)
    small = sample_npz(trained, tmp_path, "--var_type", "fixedsmall")
    assert not np.array_equal(large, small)


def test_seed_aliases_and_boolean_flags_reach_the_saved_config_the_model_and_its_samples(cifar_dir, tmp_path):
    i = TINY.index("--base_channels")
    assert_ok(run_cli(*TINY[:i], *TINY[i + 2:], "--hidden_dim", "16",
                      "--time_emb_dim", "24", "--use_attention", "False", "--no_flip", "--epochs", "1",
                      # the spellings of other trainers, shown in --help
                      "--lr", "0.002", "--save_freq", "3", "--log_interval", "5", "--workers", "2",
                      "--early_stopping_patience", "4", "--clip_x0", "dynamic", "--data_dir", cifar_dir, cwd=tmp_path))
    run_dir = tmp_path / "checkpoints" / RUN
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["base_channels"], saved["emb_dim"], saved["use_attention"], saved["flip"]) == (16, 24, False, False)
    assert [saved[k] for k in ("learning_rate", "save_every", "log_every", "num_workers", "patience", "clip_x0")] == [
        0.002, 3, 5, 2, 4, "dynamic"]
    assert read_loss_log(run_dir / "loss_log.csv")[0]["step"] == "5"
    usage = run_cli("--help", cwd=tmp_path).stdout
    assert all(f"--{a}" in usage for a in ("lr", "save_freq", "log_interval", "workers", "early_stopping_patience"))
    weights = load_ckpt(run_dir / "latest.pt")["model"]
    assert not any(".attn." in k for k in weights), "no attention block when --use_attention False"
    assert weights["time_mlp.0.weight"].shape == (24, 16)
    # the run's --clip_x0 is how its samples are made unless the sample command says otherwise
    import train_ddpm
    model, diffusion, cfg = train_ddpm.load_checkpoint(run_dir / "latest.pt")
    for flags, clip, name in (((), "dynamic", "samples_ddim5_eta0_clipdynamic_seed3.npz"),
                              (("--clip_x0", "static"), "static", "samples_ddim5_eta0_seed3.npz")):
        assert_ok(run_cli("--mode", "sample", "--checkpoint", run_dir, "--sampler", "ddim", "--sampling_steps", "5",
                          "--num_samples", "4", "--seed", "3", "--out", "s", *flags, cwd=tmp_path))
        expected = train_ddpm.generate_samples(model, diffusion, train_ddpm.SamplingSpec("ddim", 5, clip_x0=clip),
                                               (4, 3, cfg.image_size, cfg.image_size), 3)
        assert np.array_equal(np.load(tmp_path / "s" / name)["arr_0"], expected), clip


def test_importing_the_script_has_no_side_effects(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import train_ddpm"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", describe(result)
    assert list(tmp_path.iterdir()) == []


def test_every_config_field_has_a_flag_and_survives_a_checkpoint_round_trip():
    import dataclasses
    import train_ddpm
    examples = {bool: "false", int: "7", float: "0.25", tuple: "1,2"}
    parser = train_ddpm.build_parser()
    for f in dataclasses.fields(train_ddpm.Config):
        text = {"preset": "fastest", "dataset": "folder", "schedule_type": "cosine", "scheduler": "constant",
                "device": "cpu", "amp": "bf16", "channels_last": "true",
                "downsample_padding": "symmetric", "clip_x0": "dynamic",
                "t_sampling": "lognormal"}.get(f.name, examples.get(f.type, "name"))
        args = parser.parse_args([f"--{f.name}", text])
        assert train_ddpm.explicit_config(args) == {f.name: train_ddpm.field_parser(f)(text)}, f.name
    cfg = train_ddpm.preset_config("ddpm_paper", {"attn_resolutions": (16, 8)})
    stored = torch.load(_save_to_bytes({"config": dataclasses.asdict(cfg)}), weights_only=True)
    assert train_ddpm.config_from_dict(stored["config"]) == cfg


def _save_to_bytes(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_plot_loss_draws_the_log_of_a_real_run(trained, tmp_path):
    out = tmp_path / "loss.png"
    result = subprocess.run([sys.executable, str(REPO / "plot_loss.py"), str(trained.run_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert_ok(result)
    assert_valid_png(out, min_size=(400, 300))
    assert "plateau check:" in result.stdout and f"step {2 * STEPS_PER_EPOCH}" in result.stdout


def test_dpm_solver_sampling_from_the_cli_with_a_chosen_spacing_and_clip(trained, tmp_path):
    result = run_cli("--mode", "sample", "--checkpoint", trained.run_dir, "--sampler", "dpmpp2m",
                     "--sampling_steps", "6", "--timestep_spacing", "quadratic", "--num_samples", "3", cwd=tmp_path)
    assert_ok(result)
    (npz,) = (tmp_path / "samples" / RUN).glob("samples_dpmpp2m6_quadratic_seed0.npz")
    assert np.load(npz)["arr_0"].shape == (3, 32, 32, 3)
    # the same noise with dynamic thresholding: its own files, and other images (a briefly trained
    # model's x_0 at high noise is far outside [-1, 1], where the two rules differ)
    result = run_cli("--mode", "sample", "--checkpoint", trained.run_dir, "--sampler", "dpmpp2m",
                     "--sampling_steps", "6", "--timestep_spacing", "quadratic", "--num_samples", "3",
                     "--clip_x0", "dynamic", cwd=tmp_path)
    assert_ok(result)
    (dynamic,) = (tmp_path / "samples" / RUN).glob("samples_dpmpp2m6_quadratic_clipdynamic_seed0.npz")
    assert not np.array_equal(np.load(dynamic)["arr_0"], np.load(npz)["arr_0"])


# --- 11. Validation loss, quartile losses, best.pt and early stopping ------------------------------

def write_test_batch(data_dir, n=16, seed=1):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [0] * n}
    with open(data_dir / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f)


@pytest.fixture(scope="module")
def cifar_with_test_split(tmp_path_factory):
    data_dir = write_cifar_pickles(tmp_path_factory.mktemp("cifar_val"))
    write_test_batch(data_dir)
    return data_dir


# A learning rate far below float32's resolution leaves the weights, and so the validation loss,
# exactly unchanged: every epoch after the first is then "no improvement".
FROZEN = ["--learning_rate", "1e-9", "--warmup_steps", "1000000000", "--min_lr", "0"]


def test_validation_and_quartile_losses_are_logged_and_best_pt_is_kept(cifar_with_test_split, tmp_path):
    result = run_cli(*TINY, "--epochs", "2", "--val_size", "16", "--data_dir", cifar_with_test_split, cwd=tmp_path)
    assert_ok(result)
    assert "16 validation images" in result.stdout
    rows = read_loss_log(tmp_path / "checkpoints" / RUN / "loss_log.csv")
    val_rows = [r for r in rows if r["val_loss"]]
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in val_rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(float(r["val_loss"]) > 0 for r in val_rows)
    for k in (50, 250, 500, 750):  # the denoising PSNR and loss at each fixed t, logged with every validation
        assert all(-100 < float(r[f"psnr_t{k}"]) < 100 and float(r[f"val_loss_t{k}"]) > 0 for r in val_rows)
    assert "PSNR of x_0 from x_t at t=50/250/500/750" in result.stdout
    for r in train_rows:  # the quartile losses average to the loss, weighted by their (unknown) counts
        quartiles = [float(r[f"loss_q{q}"]) for q in range(4) if r[f"loss_q{q}"]]
        assert min(quartiles) - 1e-6 <= float(r["loss"]) <= max(quartiles) + 1e-6
    best = load_ckpt(tmp_path / "checkpoints" / RUN / "best.pt")
    assert abs(best["best_metric"] - min(float(r["val_loss"]) for r in val_rows)) < 1e-6


def test_early_stopping_stops_after_patience_epochs_without_improvement(cifar_with_test_split, tmp_path):
    result = run_cli(*TINY, *FROZEN, "--epochs", "6", "--val_size", "16", "--early_stopping", "--patience", "2",
                     "--data_dir", cifar_with_test_split, cwd=tmp_path)
    assert_ok(result)
    assert "early stopping" in result.stdout
    run_dir = tmp_path / "checkpoints" / RUN
    assert load_ckpt(run_dir / "latest.pt")["step"] == 3 * STEPS_PER_EPOCH
    assert not (run_dir / "ddpm_ts20_epoch0004.pt").exists()
    assert load_ckpt(run_dir / "best.pt")["step"] == STEPS_PER_EPOCH  # the first epoch was the best


def test_the_early_stopping_counter_survives_resume(cifar_with_test_split, tmp_path):
    common = [*TINY, *FROZEN, "--val_size", "16", "--early_stopping", "--patience", "3",
              "--data_dir", cifar_with_test_split]
    assert_ok(run_cli(*common, "--epochs", "2", cwd=tmp_path))  # epoch 1 best, epoch 2: one bad epoch
    assert load_ckpt(tmp_path / "checkpoints" / RUN / "latest.pt")["bad_epochs"] == 1
    result = run_cli("--run_name", RUN, "--resume", "latest", "--epochs", "10", "--data_dir", cifar_with_test_split,
                     cwd=tmp_path)
    assert_ok(result)
    assert "early stopping" in result.stdout
    assert load_ckpt(tmp_path / "checkpoints" / RUN / "latest.pt")["step"] == 4 * STEPS_PER_EPOCH


def test_early_stopping_without_validation_is_refused(tmp_path, cifar_dir):
    result = run_cli(*TINY, "--val_size", "0", "--early_stopping", "--data_dir", cifar_dir, cwd=tmp_path)
    assert_one_line_error(result, "--early_stopping", "--val_size", "--fid_every")


def test_a_folder_holds_out_a_tenth_at_most_for_validation(tmp_path):
    import train_ddpm
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), i * 8, np.uint8)).save(folder / f"{i:02d}.png")
    train, val = train_ddpm.load_image_folder(folder, 8, 1, val_size=100, seed=0)
    assert (len(train), len(val)) == (27, 3)
    colours = {int(img[0, 0, 0]) for img in train} | {int(img[0, 0, 0]) for img in val}
    assert len(colours) == 30, "train and validation images are disjoint and together all of them"
    train_again, val_again = train_ddpm.load_image_folder(folder, 8, 1, val_size=100, seed=0)
    assert np.array_equal(val, val_again), "the held-out images are the same every run"


# --- 12. FID of a checkpoint (needs pytorch-fid and the Inception weights in ../shared) ---------------

FID_WEIGHTS = REPO.parent / "shared" / "fid" / "pt_inception-2015-12-05-fc-zeroed.pth"


@pytest.mark.skipif(not FID_WEIGHTS.is_file() or importlib.util.find_spec("pytorch_fid") is None,
                    reason="needs pytorch-fid and ../shared/fid weights")
def test_eval_reports_and_logs_fid_with_its_sample_count_and_caches_the_reference(trained, cifar_dir, tmp_path):
    run = copy_run(trained, tmp_path)
    # a log from before the precision column: its row is kept under the new header
    old_columns = "time,checkpoint,step,num_samples,sampler,steps,spacing,eta,source,reference,reference_n,fid,kid,kid_std"
    (run / "fid_log.csv").write_text(old_columns + "\nT0,old.pt,1,9,ddim,5,uniform,0,ema,cifar10-train,80,1.5,0.1,0.01\n")
    args = ["--mode", "eval", "--checkpoint", run, "--num_samples", "6", "--sampler", "dpmpp2m",
            "--sampling_steps", "3", "--fid_weights", FID_WEIGHTS, "--data_dir", cifar_dir]
    first = run_cli(*args, "--amp", "bf16", cwd=tmp_path)
    assert_ok(first)
    assert re.search(r"FID \d+\.\d+ .*FID@6: 6 samples \(dpmpp2m 3 steps, bf16\) vs cifar10-train \(80 images\)",
                     first.stdout)
    cache = tmp_path / "checkpoints" / "fid_stats" / "fid_stats_cifar10-train_n80_pt_inception-2015-12-05.npz"
    mtime = cache.stat().st_mtime_ns
    assert_ok(run_cli(*args, "--amp", "off", cwd=tmp_path))
    assert cache.stat().st_mtime_ns == mtime, "the reference statistics were read from the cache"
    rows = read_loss_log(run / "fid_log.csv")
    assert (rows[0]["checkpoint"], rows[0]["fid"], rows[0]["precision"]) == ("old.pt", "1.5", "")
    assert [(r["num_samples"], r["reference_n"], r["sampler"], r["steps"], r["precision"]) for r in rows[1:]] == [
        ("6", "80", "dpmpp2m", "3", "bf16"), ("6", "80", "dpmpp2m", "3", "fp32")]


@pytest.mark.skipif(not FID_WEIGHTS.is_file() or importlib.util.find_spec("pytorch_fid") is None,
                    reason="needs pytorch-fid and ../shared/fid weights")
def test_fid_during_training_is_logged_each_epoch_and_drives_best_pt(cifar_dir, tmp_path):
    result = run_cli(*TINY, "--epochs", "2", "--fid_every", "1", "--fid_samples", "4", "--fid_weights", FID_WEIGHTS,
                     "--data_dir", cifar_dir, cwd=tmp_path)
    assert_ok(result)
    run_dir = tmp_path / "checkpoints" / RUN
    fids = [float(r["fid"]) for r in read_loss_log(run_dir / "loss_log.csv") if r["fid"]]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    rows = read_loss_log(run_dir / "fid_log.csv")
    assert [(r["step"], r["num_samples"], r["sampler"], r["reference_n"]) for r in rows] == \
        [(str(STEPS_PER_EPOCH), "4", "dpmpp2m", "80"), (str(2 * STEPS_PER_EPOCH), "4", "dpmpp2m", "80")]
    assert load_ckpt(run_dir / "best.pt")["best_metric"] == pytest.approx(min(fids), abs=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_event_files_when_asked(cifar_dir, tmp_path):
    assert_ok(run_cli(*TINY, "--epochs", "1", "--tensorboard", "--data_dir", cifar_dir, cwd=tmp_path))
    assert list((tmp_path / "checkpoints" / RUN / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_is_a_one_line_error(cifar_dir, tmp_path):
    assert_one_line_error(run_cli(*TINY, "--epochs", "1", "--tensorboard", "--data_dir", cifar_dir, cwd=tmp_path),
                          "pip install tensorboard")
    assert not (tmp_path / "checkpoints").exists()


def test_the_script_and_readme_name_every_preset():
    import train_ddpm
    readme = (REPO / "README.md").read_text()
    missing = [name for name in train_ddpm.PRESETS if name not in train_ddpm.__doc__ or f"`{name}`" not in readme]
    assert not missing, f"presets the module docstring or the README leave out: {missing}"
