"""The LR schedules users come with (StepLR, none) and the warnings where runs lose their LR:
a schedule that spends a fifth of the run at its floor, and a cosine re-planned by a resume with
more epochs. The math against PyTorch's own schedulers; the flags through the real CLI."""

import contextlib
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import plot_loss
import train_ddpm as td
from test_cli import RUN, TINY, assert_ok, assert_one_line_error, cifar_dir, read_loss_log, run_cli  # noqa: F401


def schedule(steps_per_epoch=5, **overrides):
    cfg = dataclasses.replace(td.Config(), **{**dict(learning_rate=1e-3, min_lr=1e-5, warmup_steps=0, epochs=20),
                                              **overrides})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    return td.LRSchedule(optimizer, cfg, steps_per_epoch), cfg


def test_step_scheduler_is_pytorchs_steplr_stepped_every_epoch():
    spe = 4
    ours, cfg = schedule(spe, scheduler="step", step_size=3, gamma=0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    theirs = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    for epoch in range(12):
        for step in range(epoch * spe, (epoch + 1) * spe):
            assert ours.set_step(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        optimizer.step()  # PyTorch's order: the optimizer's epoch, then the scheduler's step
        theirs.step()


def test_step_scheduler_counts_its_epochs_from_the_end_of_warmup():
    ours, cfg = schedule(5, scheduler="step", step_size=2, gamma=0.1, warmup_steps=3)
    assert ours.set_step(2) == pytest.approx(1e-3)
    assert ours.set_step(3 + 9) == pytest.approx(1e-3) and ours.set_step(3 + 10) == pytest.approx(1e-4)


def test_cosine_until_reaches_min_lr_at_that_step_and_stays_there():
    ours, cfg = schedule(5, scheduler="cosine", warmup_steps=10, cosine_until=50)
    assert ours.set_step(30) == pytest.approx(cfg.min_lr + (cfg.learning_rate - cfg.min_lr) / 2, rel=1e-12)
    assert ours.set_step(50) == pytest.approx(cfg.min_lr, rel=1e-12)
    assert ours.set_step(99) == pytest.approx(cfg.min_lr, rel=1e-12)  # the run's last step (20 epochs of 5)


def test_none_is_read_as_constant_from_flags_and_the_menu():
    parse = td.field_parser(td.CONFIG_FIELDS["scheduler"])
    assert parse("none") == "constant" and parse("step") == "step"


@pytest.mark.parametrize("name", list(td.PRESETS))
def test_no_preset_warns_about_its_own_schedule(name):
    assert td.lr_schedule_warning(td.preset_config(name, {}), steps_per_epoch=390) is None


def test_a_steplr_that_drops_too_often_is_warned_about_with_its_numbers_and_fix():
    cfg = dataclasses.replace(td.Config(), scheduler="step", step_size=20, gamma=0.1, epochs=100, warmup_steps=0,
                              learning_rate=1e-3)
    # drops at epochs 20, 40, 60, 80: below 1% of the peak (1e-5) from epoch 60 on, 40% of the run
    warning = td.lr_schedule_warning(cfg, steps_per_epoch=10)
    assert "40%" in warning and "1,000 steps" in warning and "from about step 600" in warning
    assert "--step_size" in warning


def test_warm_restarts_to_zero_are_not_warned_about_a_warmup_is_not_counted_and_steplr_is():
    # restarts down to 0: (1 + cos(pi x)) / 2 < 1% only for x > 0.936, 6.4% of each period, never a
    # fifth; the 5,000 warmup steps of 10,000 start below 1% too, by design, and are not counted
    cfg = dataclasses.replace(td.Config(), scheduler="cosine_restarts", restart_period=2, epochs=100,
                              warmup_steps=5000, learning_rate=1e-3, min_lr=0.0)
    assert td.lr_schedule_warning(cfg, steps_per_epoch=100) is None
    steps = dataclasses.replace(cfg, scheduler="step", step_size=10, gamma=0.005)  # 5e-6 from step 6,000 on
    warning = td.lr_schedule_warning(steps, steps_per_epoch=100)
    assert "40%" in warning and "from about step 6,000" in warning  # 4,000 of the 10,000 steps


def test_a_deliberate_floor_of_cosine_until_is_not_warned_about():
    cfg = dataclasses.replace(td.Config(), scheduler="cosine", epochs=100, warmup_steps=0, cosine_until=400,
                              learning_rate=1e-3, min_lr=0.0)
    assert td.lr_schedule_warning(cfg, steps_per_epoch=10) is None


def test_plot_loss_says_the_same_from_the_logged_lr():
    step = np.arange(10, 1010, 10, dtype=float)
    lr = np.where(step < 600, 1e-3, 1e-6)
    (line,) = plot_loss.lr_schedule_check(step, lr)
    assert "41%" in line and "from step 600" in line
    assert plot_loss.lr_schedule_check(step, np.full(len(step), 1e-3)) == []
    session = (step > 500).astype(float)
    lr = np.where(step <= 500, 1e-6, 5e-4)  # a resume at step 510 jumps back up from the floor
    notes = [line for line in plot_loss.lr_schedule_check(step, lr, session) if line.startswith("note")]
    assert len(notes) == 1 and "step 510" in notes[0] and "--cosine_until" in notes[0]


# --- Through the real command line -------------------------------------------------------------------

TWO = [*TINY, "--sample_every", "0", "--val_size", "0", "--scheduler", "cosine", "--min_lr", "1e-5"]


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory, cifar_dir):
    """One epoch (5 steps) of a cosine run: it ends at its floor."""
    root = tmp_path_factory.mktemp("cosine")
    assert_ok(run_cli(*TWO, "--epochs", "1", "--data_dir", cifar_dir, cwd=root))
    return root


def copy_of(root, tmp_path):
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def test_resuming_a_finished_cosine_with_more_epochs_says_the_lr_jumps_and_how_to_keep_the_floor(
        cosine_run, cifar_dir, tmp_path):
    root = copy_of(cosine_run, tmp_path)
    result = run_cli(*TWO, "--resume", "latest", "--epochs", "3", "--data_dir", cifar_dir, cwd=root)
    assert_ok(result)
    note = next(line for line in result.stderr.splitlines() if line.startswith("note: the cosine"))
    assert "now ends at step 15 instead of 5" in note
    assert "at step 5 the LR goes from its floor 1e-05 to 0.00087" in note
    assert note.endswith("--cosine_until 5")
    rows = [r for r in read_loss_log(root / "checkpoints" / RUN / "loss_log.csv") if r["lr"]]
    assert float(rows[-1]["lr"]) < 3e-5  # the re-planned cosine's last step, one step before its floor
    assert max(float(r["lr"]) for r in rows if int(r["step"]) > 5) > 0.5e-3  # after climbing back near the peak


def test_resuming_with_cosine_until_keeps_the_lr_at_its_floor_and_says_so(cosine_run, cifar_dir, tmp_path):
    root = copy_of(cosine_run, tmp_path)
    result = run_cli(*TWO, "--resume", "latest", "--epochs", "2", "--cosine_until", "5", "--data_dir", cifar_dir,
                     cwd=root)
    assert_ok(result)
    assert "the LR stays at its floor 1e-05 (the cosine ended at step 5)" in result.stderr
    assert "over the run's 10 steps instead, resume with --cosine_until 0" in result.stderr
    rows = [r for r in read_loss_log(root / "checkpoints" / RUN / "loss_log.csv") if r["lr"] and int(r["step"]) > 5]
    assert rows and all(float(r["lr"]) == pytest.approx(1e-5) for r in rows)


def test_scheduler_none_is_stored_as_constant_and_resumes_a_constant_run(cifar_dir, tmp_path):
    args = [*TINY, "--sample_every", "0", "--val_size", "0", "--data_dir", cifar_dir]
    assert_ok(run_cli(*args, "--scheduler", "none", "--epochs", "1", cwd=tmp_path))
    assert json.loads((tmp_path / "checkpoints" / RUN / "config.json").read_text())["scheduler"] == "constant"
    assert_ok(run_cli(*args, "--scheduler", "none", "--resume", "latest", "--epochs", "2", cwd=tmp_path))


def test_step_scheduler_through_the_cli_drops_the_logged_lr_every_step_size_epochs(cifar_dir, tmp_path):
    result = run_cli(*TINY, "--sample_every", "0", "--val_size", "0", "--data_dir", cifar_dir, "--warmup_steps", "0",
                     "--scheduler", "step", "--step_size", "1", "--gamma", "0.5", "--epochs", "2", cwd=tmp_path)
    assert_ok(result)
    rows = {int(r["step"]): float(r["lr"]) for r in read_loss_log(tmp_path / "checkpoints" / RUN / "loss_log.csv")
            if r["lr"]}
    assert rows[4] == pytest.approx(1e-3) and rows[6] == pytest.approx(5e-4)  # epoch 2 starts at step 5


def test_a_bad_schedule_flag_gets_one_line_and_exit_2_through_the_cli(tmp_path):
    result = run_cli(*TINY, "--gamma", "0", cwd=tmp_path)
    assert_one_line_error(result, "--gamma")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags, fragment", [(["--gamma", "1.5"], "--gamma"), (["--step_size", "0"], "--step_size"),
                                             (["--scheduler", "cosine", "--cosine_until", "-1"], "--cosine_until"),
                                             (["--cosine_until", "50"], "needs --scheduler cosine"),
                                             (["--scheduler", "linear"], "--scheduler")])
def test_every_bad_schedule_flag_is_refused_by_main_in_one_line(flags, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if flags[-1] == "linear" else contextlib.nullcontext():
        assert td.main([*TINY, *flags]) == 2  # argparse's choices exit 2 by themselves
    (line,) = capsys.readouterr().err.splitlines()
    assert fragment in line and list(tmp_path.iterdir()) == []
