"""plot_loss.py: reads a real loss log, draws the PNG, marks events and judges plateaus."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import plot_loss  # noqa: E402

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "session")


def write_log(path, steps, loss, lr, steps_per_epoch=100, session=None):
    session = np.zeros(len(steps), int) if session is None else session
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, s in enumerate(steps):
            writer.writerow([s, f"{s / steps_per_epoch:.4f}", loss[i], lr[i], 0.5, 100.0, s * 0.1, session[i]])


def run_plot(*args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "plot_loss.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_plot_of_a_run_folder_writes_a_png_and_prints_the_diagnostic(tmp_path):
    run = tmp_path / "checkpoints" / "demo_ts100"
    run.mkdir(parents=True)
    steps = np.arange(10, 1010, 10)
    write_log(run / "loss_log.csv", steps, 0.05 + 0.5 * np.exp(-steps / 200), np.full(len(steps), 2e-4))
    result = run_plot(run)
    assert result.returncode == 0, result.stderr
    png = run / "loss_plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plateau check:" in result.stdout
    assert str(png) in result.stdout


def test_without_a_path_the_newest_run_under_checkpoints_is_plotted(tmp_path):
    run = tmp_path / "checkpoints" / "only_run"
    run.mkdir(parents=True)
    steps = np.arange(1, 51)
    write_log(run / "loss_log.csv", steps, np.linspace(1, 0.1, 50), np.full(50, 1e-4))
    out = tmp_path / "custom.png"
    result = run_plot("--out", out, "--smooth", 5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.exists() and not (run / "loss_plot.png").exists()


@pytest.mark.parametrize("make_input, expected", [
    (lambda d: d / "missing_run", "does not exist"),
    (lambda d: (d / "empty.csv").write_text(",".join(COLUMNS) + "\n") and d / "empty.csv", "no rows"),
    (lambda d: (d / "other.csv").write_text("a,b\n1,2\n") and d / "other.csv", "missing columns"),
])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, make_input, expected):
    result = run_plot(make_input(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_plateau_diagnostic_tells_improving_converged_and_stalled_apart():
    rng = np.random.default_rng(0)
    steps = np.arange(200)
    improving = 0.2 * np.exp(-steps / 100) + 0.03
    converged = 0.04 + 0.0005 * rng.standard_normal(200)
    stalled = 0.04 + 0.01 * rng.standard_normal(200)
    rising = 0.04 + 0.0002 * steps
    assert plot_loss.plateau_diagnostic(improving)[0] == "still improving"
    assert plot_loss.plateau_diagnostic(converged)[0] == "converged"
    assert plot_loss.plateau_diagnostic(stalled)[0] == "stalled"
    assert plot_loss.plateau_diagnostic(rising)[0] == "stalled"


def test_resume_points_epochs_and_warm_restarts_are_found_where_they_happen():
    steps = np.arange(10, 610, 10)
    session = (steps > 300).astype(int)
    assert list(plot_loss.resume_points(steps, session)) == [310]
    epoch = steps / 100
    assert list(plot_loss.epoch_boundaries(steps, epoch)) == [100, 200, 300, 400, 500, 600]
    # warmup over 50 steps, then cosine restarts every 200 steps
    lr = np.where(steps < 50, 1e-3 * steps / 50,
                  1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * ((steps - 50) % 200) / 200)))
    assert list(plot_loss.warm_restarts(steps, lr)) == [250, 450]


def test_moving_average_is_a_trailing_mean():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert np.allclose(plot_loss.moving_average(values, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    assert np.allclose(plot_loss.moving_average(values, 1), values)


def test_validation_and_quartile_panels_are_drawn_when_the_log_has_them(tmp_path):
    columns = ("step", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm",
               "images_per_s", "elapsed_s", "session", "val_loss")
    with open(tmp_path / "loss_log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for step in range(10, 410, 10):
            loss = 0.05 + 0.5 * np.exp(-step / 100)
            writer.writerow([step, step / 100, loss, 2 * loss, loss, loss / 2, loss / 3, 1e-4, 0.3, 90, step, 0, ""])
            if step % 100 == 0:
                writer.writerow([step, step / 100, "", "", "", "", "", "", "", "", step, 0, 0.1 + 1 / step])
    result = run_plot(tmp_path, "--out", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    assert "validation loss 0.1025 (best 0.1025)" in result.stdout
    assert "final loss" in result.stdout and "step 400" in result.stdout
    from PIL import Image
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[1] > 1000, "three panels stacked"


def test_previews_become_an_animated_gif_one_labelled_frame_per_epoch(tmp_path):
    from PIL import Image
    run = tmp_path / "checkpoints" / "demo"
    run.mkdir(parents=True)
    steps = np.arange(10, 310, 10)
    write_log(run / "loss_log.csv", steps, np.linspace(1, 0.1, len(steps)), np.full(len(steps), 1e-4))
    (run / "config.json").write_text('{"samples_dir": "samples", "run_name": "demo", "preset": "x", "timesteps": 10}')
    assert run_plot(run, "--progress", cwd=tmp_path).returncode == 2  # asked for, but no previews yet
    previews = tmp_path / "samples" / "demo"
    previews.mkdir(parents=True)
    for epoch in (1, 2, 3, 10):  # epoch 10 sorts after 2 by number, not by name
        Image.new("RGB", (42, 12), (20 * epoch, 0, 0)).save(previews / f"epoch_{epoch:04d}.png")
    result = run_plot(run, cwd=REPO)  # from elsewhere: found beside the checkpoints folder
    assert result.returncode == 0, result.stderr
    gif = Image.open(run / "progress.gif")
    assert gif.n_frames == 4 and gif.size == (84, 24 + 16)
    reds = []
    for frame in range(gif.n_frames):
        gif.seek(frame)
        reds.append(gif.convert("RGB").getpixel((40, 30))[0])
    assert reds == sorted(reds) and reds[-1] > reds[0]  # in epoch order
    gif.seek(0)
    assert min(gif.convert("L").crop((0, 0, 84, 16)).getdata()) < 128  # the epoch is written above the grid
    assert "4 previews, epochs 1-10" in result.stdout
