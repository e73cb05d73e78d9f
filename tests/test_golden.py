"""The script's outputs, bit for bit, against a record made by an earlier version of it: a tiny
class-conditional run and a tiny unconditional run stopped and resumed, through the real command
line; their loss logs, every checkpoint tensor, the preview grids, and the samples of every sampler
with and without guidance and thresholding, with the trajectory picture.

A restructuring of the script must leave all of these unchanged. If a change of behaviour is meant,
record again with GOLDEN_RECORD=1 python -m pytest tests/test_golden.py and say why in the commit.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_ddpm as td

RECORD = Path(__file__).with_name("golden.json")
CLASSES = ("cat", "dog", "frog")
COMMON = ["--preset", "quick_test", "--dataset", "folder", "--image_size", "8", "--base_channels", "16",
          "--channel_mults", "1,2", "--timesteps", "20", "--beta_start", "0.005", "--beta_end", "0.999",
          "--batch_size", "12", "--train_subset", "0", "--num_preview", "3", "--preview_steps", "3",
          "--log_every", "2", "--warmup_steps", "2", "--num_workers", "1", "--device", "cpu", "--seed", "5"]
CONDITIONAL = ["--class_conditional", "--class_dropout", "0.3", "--guidance_scale", "2", "--val_size", "6",
               "--clip_x0", "dynamic", "--run_name", "cond"]
UNCONDITIONAL = ["--val_size", "0", "--dropout", "0.1", "--grad_clip", "0.5", "--scheduler", "cosine",
                 "--run_name", "uncond"]
# (run, flags) of --mode sample: every sampler, its own options, guidance and each thresholding rule
SAMPLES = [
    ("uncond", ["--sampler", "ddpm"]),
    ("uncond", ["--sampler", "ddpm", "--sampling_steps", "7", "--var_type", "fixedsmall", "--trajectory"]),
    ("uncond", ["--sampler", "ddim", "--sampling_steps", "6", "--eta", "0.5", "--clip_x0", "none"]),
    ("uncond", ["--sampler", "dpmpp2m", "--sampling_steps", "5", "--clip_x0", "dynamic", "--trajectory"]),
    ("uncond", ["--sampler", "ddim", "--sampling_steps", "5", "--timestep_spacing", "trailing", "--no_ema"]),
    ("cond", ["--sampler", "ddpm", "--sampling_steps", "8", "--guidance_scale", "1"]),
    ("cond", ["--sampler", "ddim", "--sampling_steps", "6", "--trajectory"]),
    ("cond", ["--sampler", "dpmpp2m", "--sampling_steps", "6", "--guidance_scale", "3", "--clip_x0", "static"]),
    ("cond", ["--sampler", "dpmpp2m", "--sampling_steps", "4", "--class_label", "dog", "--guidance_scale", "0"]),
    ("cond", ["--sampler", "ddpm", "--sampling_steps", "5", "--num_samples", "5", "--guidance_scale", "1.5",
              "--clip_x0", "none", "--seed", "11"]),
]
LOSS_COLUMNS = ("step", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "bad_steps",
                "val_loss")


def digest(data):
    return hashlib.sha256(data).hexdigest()[:20]


def tensor_digests(value, prefix=""):
    """{dotted key: hash of dtype, shape and bytes} of every tensor in a nested checkpoint, and the
    other values as they are."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        return {prefix: f"{t.dtype} {tuple(t.shape)} {digest(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')}"}
    if isinstance(value, dict):
        return {k: v for key in sorted(value, key=str) for k, v in tensor_digests(value[key], f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in tensor_digests(item, f"{prefix}[{i}]").items()}
    return {prefix: repr(value)}


def folder_digests(folder):
    """{relative path: hash} of every file under folder."""
    return {p.relative_to(folder).as_posix(): digest(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def loss_rows(path):
    import csv
    with open(path, newline="") as f:
        return [",".join(row[k] for k in LOSS_COLUMNS) for row in csv.DictReader(f)]


def write_images(root):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(12):
            image = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
            image[..., c] += 180
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def run(argv):
    code = td.main(argv)
    assert code in (None, 0), f"{argv} exited {code}"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    data = write_images(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run([*COMMON, *CONDITIONAL, "--data_dir", data, "--epochs", "3"])
        run([*COMMON, *UNCONDITIONAL, "--data_dir", data, "--epochs", "1"])
        run([*COMMON, *UNCONDITIONAL, "--data_dir", data, "--epochs", "3", "--resume", "latest"])
        for i, (name, flags) in enumerate(SAMPLES):
            run(["--mode", "sample", "--checkpoint", f"checkpoints/{name}", "--num_samples", "4", "--batch_size", "3",
                 "--device", "cpu", "--out", f"out{i}", *flags])
    finally:
        os.chdir(cwd)
    found = {}
    for name in ("cond", "uncond"):
        checkpoints = root / "checkpoints" / name
        found[f"{name} loss log"] = loss_rows(checkpoints / "loss_log.csv")
        for ckpt in sorted(checkpoints.glob("*.pt")):
            if ckpt.name != "latest.pt":
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
                state["config"] = {k: v for k, v in state["config"].items() if k not in ("data_dir",)}
                for clock in ("meter", "elapsed_s", "torch_version"):
                    state.pop(clock, None)
                found[f"{name} {ckpt.name}"] = {key: digest(repr(sorted(tensor_digests(state[key]).items())).encode())
                                                for key in state}
        found[f"{name} previews"] = folder_digests(root / "samples" / name)
    for i in range(len(SAMPLES)):
        found[f"samples {i}"] = folder_digests(root / f"out{i}")
    return found


def test_outputs_are_the_recorded_ones_bit_for_bit(outputs):
    if os.environ.get("GOLDEN_RECORD"):
        RECORD.write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {RECORD.name}")
    recorded = json.loads(RECORD.read_text())
    assert outputs.keys() == recorded.keys()
    for key in recorded:
        got, want = outputs[key], recorded[key]
        if isinstance(want, dict):
            assert got.keys() == want.keys(), f"{key}: other entries {sorted(set(got) ^ set(want))}"
            differing = [k for k in want if got[k] != want[k]]
            assert not differing, f"{key}: {len(differing)} differ, first {differing[:5]}"
        else:
            assert got == want, f"{key} differs"
