"""--wandb: a real training run logs to Weights & Biases in its offline mode, and the tests read back
what it wrote locally (W&B's run file: a LevelDB-style record log of protobuf records)."""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from test_cli import (OFFLINE, RUN, SCRIPT, TINY, assert_ok, assert_one_line_error, cifar_with_test_split,  # noqa: F401
                      read_loss_log)

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


def run_cli_env(*args, cwd, extra_env):
    env = {**os.environ, **OFFLINE, **extra_env}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def offline_env(tmp_path):
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wb_config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wb_data")}


def wandb_records(path):
    """The protobuf records of a W&B run file: 7 header bytes, then 32 KiB blocks of records, each
    with a 7-byte header (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last part)."""
    from wandb.proto import wandb_internal_pb2
    data, records, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records):
    """The logged rows, as {key: value}."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@needs_wandb
def test_a_run_logs_config_losses_validation_and_previews_and_a_resume_continues_the_same_wandb_run(
        cifar_with_test_split, tmp_path):
    args = [*TINY, "--wandb", "--wandb_project", "ddpm-tests", "--val_size", "16", "--data_dir", cifar_with_test_split]
    assert_ok(run_cli_env(*args, "--epochs", "2", cwd=tmp_path, extra_env=offline_env(tmp_path)))
    run_dir = tmp_path / "checkpoints" / RUN
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(first)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.project) == (run_id, RUN, "ddpm-tests")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["preset"] == "quick_test" and config["timesteps"] == 20 and config["batch_size"] == 16
    rows = history(records)
    logged = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    in_log = {int(r["step"]): float(r["loss"]) for r in read_loss_log(run_dir / "loss_log.csv") if r["loss"]}
    assert logged.keys() == in_log.keys() and all(abs(logged[s] - in_log[s]) < 1e-6 for s in logged)
    evaluations = [r for r in rows if "eval/val_loss" in r]
    assert [r["step"] for r in evaluations] == [5, 10] and all("eval/psnr_t50" in r for r in evaluations)
    previews = [r for r in rows if "preview/_type" in r]
    assert [r["step"] for r in previews] == [5, 10] and previews[0]["preview/_type"] == "image-file"

    assert_ok(run_cli_env(*args, "--resume", "latest", "--epochs", "3", cwd=tmp_path, extra_env=offline_env(tmp_path)))
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    second = [p for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb") if p != first]
    assert len(second) == 1, "the resumed session logs to the same W&B run id"
    resumed = history(wandb_records(second[0]))
    assert {r["step"] for r in resumed if "train/loss" in r} == {12, 14, 15}


def test_wandb_without_the_package_is_a_one_line_error_before_anything_is_written(cifar_with_test_split, tmp_path):
    fake = tmp_path / "no_wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli_env(*TINY, "--wandb", "--epochs", "1", "--data_dir", cifar_with_test_split, cwd=work,
                         extra_env={"PYTHONPATH": str(tmp_path / "no_wandb")})
    assert_one_line_error(result, "pip install wandb")
    assert list(work.iterdir()) == []
