"""--mode lr_find: the ramp's reading against curves with known answers, and the real command line
on data the tests write (what it prints and writes, that it touches no run, its one-line errors)."""

import csv
import re

import numpy as np
import pytest

import train_ddpm as td
from test_cli import TINY, assert_ok, assert_one_line_error, cifar_dir, run_cli, snapshot  # noqa: F401


def test_centered_mean_averages_each_point_with_its_neighbours_on_both_sides():
    values = np.array([1.0, 2.0, 6.0, 4.0, 5.0])
    assert np.allclose(td.centered_mean(values, 1), [1.5, 3.0, 4.0, 5.0, 4.5])


def test_the_ramp_is_read_at_its_lowest_loss_and_the_round_lr_below_it():
    lrs = 1e-6 * (1e6) ** (np.arange(400) / 399)
    x = np.log(lrs)
    # falls from 1 to 0.5 around lr 1e-3 (a logistic in log lr), rises again above 3e-2: lowest near 3e-2
    losses = 0.5 + 0.5 / (1 + np.exp(2 * (x - np.log(1e-3)))) + np.maximum(0, x - np.log(3e-2)) ** 2
    finding = td.read_lr_ramp(lrs, losses)
    assert 2.0e-2 < finding.largest_stable < 4.5e-2  # the smoothing blurs the minimum a little
    assert finding.suggested == pytest.approx(2e-2)


@pytest.mark.parametrize("lr, expected", [(1.68e-3, 1e-3), (2e-3, 2e-3), (4.99e-4, 2e-4), (9.99e-3, 5e-3),
                                          (1e-2, 1e-2), (0.7, 0.5), (3e-7, 2e-7)])
def test_round_lr_down_takes_the_largest_1_2_5_step_not_above_the_lr(lr, expected):
    assert td.round_lr_down(lr) == pytest.approx(expected, rel=1e-12)


def test_a_diverged_end_of_nan_is_left_out_of_the_reading():
    lrs = np.geomspace(1e-6, 1, 200)
    losses = np.concatenate([np.linspace(1, 0.2, 150), np.linspace(0.2, 2, 49), [np.nan]])
    finding = td.read_lr_ramp(lrs, losses)
    assert finding.largest_stable == pytest.approx(lrs[149], rel=0.2)
    assert finding.largest_stable / 2.5 < finding.suggested <= finding.largest_stable
    assert len(finding.losses) == 199 and np.isfinite(finding.smoothed).all()


def test_a_loss_that_only_rises_names_no_lr():
    lrs = np.geomspace(1e-6, 1, 50)
    finding = td.read_lr_ramp(lrs, np.linspace(1, 3, 50))
    assert finding.suggested is None and finding.largest_stable is None


FIND = [*TINY, "--mode", "lr_find", "--lr_find_steps", "30", "--lr_find_min", "1e-5", "--lr_find_max", "0.1"]


def test_lr_find_prints_a_table_and_its_suggestion_and_writes_a_plot_and_csv_without_touching_runs(
        cifar_dir, tmp_path):
    (tmp_path / "checkpoints" / "quick_test_ts20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "quick_test_ts20" / "config.json").write_text("{}")
    before = snapshot(tmp_path / "checkpoints")
    result = run_cli(*FIND, "--data_dir", cifar_dir, cwd=tmp_path)
    assert_ok(result)
    assert "| learning rate | loss (smoothed) |" in result.stdout
    assert re.search(r"suggested --learning_rate \d.*largest stable \d", result.stdout), result.stdout
    assert snapshot(tmp_path / "checkpoints") == before and not (tmp_path / "samples").exists()
    png, table = (tmp_path / "lr_find" / f"lr_find_quick_test_ts20.{ext}" for ext in ("png", "csv"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    assert len(rows) <= 30 and lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert all(float(r["loss"]) > 0 for r in rows)
    again = run_cli(*FIND, "--data_dir", cifar_dir, cwd=tmp_path)  # a second call keeps the first's files
    assert_ok(again)
    assert (tmp_path / "lr_find" / "lr_find_quick_test_ts20_2.png").is_file() and png.is_file()


def test_the_ramp_stops_when_the_loss_diverges(cifar_dir, tmp_path):
    result = run_cli(*TINY, "--mode", "lr_find", "--lr_find_steps", "60", "--lr_find_min", "1e-4",
                     "--lr_find_max", "1e4", "--data_dir", cifar_dir, cwd=tmp_path)
    assert_ok(result)
    with open(tmp_path / "lr_find" / "lr_find_quick_test_ts20.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) < 60


def test_a_bad_lr_find_flag_gets_one_line_and_exit_2_through_the_cli(tmp_path):
    result = run_cli(*TINY, "--mode", "lr_find", "--lr_find_steps", "5", cwd=tmp_path)
    assert_one_line_error(result, "--lr_find_steps")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, fragment", [(["--lr_find_min", "1", "--lr_find_max", "0.1"], "--lr_find_min"),
                                             (["--batch_size", "0"], "--batch_size"),
                                             (["--num_gpus", "2"], "--num_gpus"), (["--resume", "latest"], "--resume")])
def test_every_bad_lr_find_flag_is_refused_by_main_in_one_line(flags, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert td.main([*TINY, "--mode", "lr_find", *flags]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert fragment in line and list(tmp_path.iterdir()) == []
