"""The script's outputs against a record made by an earlier version of it: a tiny class-conditional
run and a tiny unconditional run stopped and resumed, through the real command line; their loss
logs, every checkpoint tensor, the preview grids, and the samples of every sampler with and without
guidance and thresholding, with the trajectory picture.

A restructuring of the script must leave all of these unchanged. Two checks:
- bit for bit, where the machine is the one that made the record (same CPU, vector unit, thread
  count and torch): float sums are rounded in an order that depends on all of these;
- on any machine, to within what rounding does there: logged values to relative 1e-3, images to a
  pixel level on average, and each weight tensor's sum and sum of magnitudes to a tenth of the latter
  (bf16 autocast and Adam's near-sign updates of near-zero gradients move a few weights by a step;
  an Intel and an AMD CPU differed by at most 2e-4, 2 levels and 3% of that). Any change of
  behaviour (another random draw, formula, order of steps or default) moves the loss log and the
  images far more.
If a change of behaviour is meant, record again with GOLDEN_RECORD=1 python -m pytest
tests/test_golden.py and say why in the commit.
"""

import base64
import hashlib
import json
import math
import os
import platform
import re
import zlib
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


def machine():
    """What float rounding depends on: the CPU, its vector unit, the thread count and torch."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        cpu += " " + digest(" ".join(sorted(flags)).encode())
    kernels = " ".join(f"{k}={os.environ[k]}" for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if k in os.environ)
    return (f"{cpu} | {torch.backends.cpu.get_cpu_capability()} {kernels}".rstrip()
            + f" | {torch.get_num_threads()} threads | torch {torch.__version__}")


def is_float(value):
    return isinstance(value, float) or (isinstance(value, torch.Tensor) and value.is_floating_point())


def flatten(value, prefix=""):
    """{dotted key: leaf} of a nested checkpoint."""
    if isinstance(value, dict):
        return {k: v for key in sorted(value, key=str) for k, v in flatten(value[key], f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def exact(leaf):
    """A leaf as a string: a tensor's dtype, shape and the hash of its bytes, anything else its repr."""
    if isinstance(leaf, torch.Tensor):
        t = leaf.detach().cpu().contiguous().reshape(-1)
        return f"{t.dtype} {tuple(leaf.shape)} {digest(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')}"
    return repr(leaf)


def numbers(leaf):
    """A float leaf as [sum, sum of magnitudes] (one number for a Python float), for comparing within rounding."""
    if isinstance(leaf, float):
        return [leaf]
    t = leaf.detach().cpu().double()
    return [float(f"{t.sum().item():.8g}"), float(f"{t.abs().sum().item():.8g}")]


def checkpoint_records(state):
    """(exact: {top-level key: hash}, values: {top-level key: {"fixed": hash of its non-float leaves and
    float shapes, "floats": [numbers of each float leaf]}})."""
    exact_record, values = {}, {}
    for key in state:
        leaves = flatten(state[key])
        exact_record[key] = digest(repr(sorted((k, exact(v)) for k, v in leaves.items())).encode())
        fixed = [(k, exact(v) if not is_float(v) else (str(v.dtype), tuple(v.shape)) if isinstance(v, torch.Tensor)
                  else "float") for k, v in sorted(leaves.items())]
        values[key] = {"fixed": digest(repr(fixed).encode()),
                       "floats": [numbers(v) for k, v in sorted(leaves.items()) if is_float(v)]}
    return exact_record, values


def pixels(path):
    """The uint8 pixels of an image file (PNG, or the array in a samples .npz), with their shape; the
    hash of any other file (the labels of class-conditional samples)."""
    if path.suffix not in (".png", ".npz"):
        return {"file": digest(path.read_bytes())}
    if path.suffix == ".npz":
        with np.load(path) as f:
            array = f["arr_0"]
    else:
        array = np.asarray(Image.open(path))
    return {"shape": list(array.shape), "pixels": base64.b64encode(zlib.compress(array.astype(np.uint8).tobytes())).decode()}


def decode(record):
    return np.frombuffer(zlib.decompress(base64.b64decode(record["pixels"])), np.uint8).reshape(record["shape"])


def folder_records(folder):
    """(exact: {relative path: hash of the file}, values: {relative path: pixels})."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return ({p.relative_to(folder).as_posix(): digest(p.read_bytes()) for p in files},
            {p.relative_to(folder).as_posix(): pixels(p) for p in files})


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
    """{"machine": ..., "exact": {entry: hashes}, "values": {entry: numbers and pixels}} of the runs."""
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
    found = {"machine": machine(), "exact": {}, "values": {}}

    def add(entry, records):
        found["exact"][entry], found["values"][entry] = records

    for name in ("cond", "uncond"):
        checkpoints = root / "checkpoints" / name
        rows = loss_rows(checkpoints / "loss_log.csv")
        add(f"{name} loss log", (rows, [[float(c) if c else None for c in row.split(",")] for row in rows]))
        for ckpt in sorted(checkpoints.glob("*.pt")):
            if ckpt.name != "latest.pt":
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
                state["config"] = {k: v for k, v in state["config"].items() if k not in ("data_dir",)}
                for clock in ("meter", "elapsed_s", "torch_version"):
                    state.pop(clock, None)
                add(f"{name} {ckpt.name}", checkpoint_records(state))
        add(f"{name} previews", folder_records(root / "samples" / name))
    for i in range(len(SAMPLES)):
        add(f"samples {i}", folder_records(root / f"out{i}"))
    return found


@pytest.fixture(scope="module")
def recorded(outputs):
    if os.environ.get("GOLDEN_RECORD"):
        text = json.dumps(outputs, indent=1, sort_keys=True)
        text = re.sub(r"\[\s+([^][{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        RECORD.write_text(text + "\n")  # lists of numbers on one line each
        pytest.skip(f"recorded {RECORD.name}")
    return json.loads(RECORD.read_text())


def close(got, want, rtol=1e-3, atol=1e-7):
    if got is None or want is None or got == want or math.isnan(got) or math.isnan(want):
        return got == want or (got is not None and want is not None and math.isnan(got) and math.isnan(want))
    return abs(got - want) <= rtol * abs(want) + atol


def value_differences(got, want, entry):
    """The names of what differs in one entry beyond float rounding."""
    if entry.endswith("loss log"):  # rows of numbers: step, epoch, losses, lr, grad norm, ...
        if len(got) != len(want):
            return [f"{len(got)} rows, recorded {len(want)}"]
        return [f"row {i} column {LOSS_COLUMNS[j]}" for i, (g, w) in enumerate(zip(got, want))
                for j, (a, b) in enumerate(zip(g, w)) if not close(a, b)]
    if got.keys() != want.keys():
        return [f"other entries {sorted(set(got) ^ set(want))}"]
    differing = []
    for key in want:
        g, w = got[key], want[key]
        if "file" in w:
            if g != w:
                differing.append(key)
        elif "pixels" in w:  # an image: same shape, within a pixel level on average, no pixel far off
            a, b = decode(g).astype(int), decode(w).astype(int)
            if a.shape != b.shape or np.abs(a - b).mean() > 1.0 or np.abs(a - b).max() > 64:
                differing.append(key)
        elif g["fixed"] != w["fixed"] or len(g["floats"]) != len(w["floats"]):
            differing.append(key)
        elif not all(close(x, y, rtol=0 if len(nw) == 2 else 1e-3, atol=0.1 * nw[-1] + 1e-7 if len(nw) == 2 else 1e-7)
                     for ng, nw in zip(g["floats"], w["floats"]) for x, y in zip(ng, nw)):
            differing.append(key)  # a tensor's sums within a tenth of its sum of magnitudes
    return differing


def test_outputs_match_the_record_to_within_float_rounding(outputs, recorded):
    assert outputs["values"].keys() == recorded["values"].keys()
    differing = {entry: d for entry in recorded["values"]
                 if (d := value_differences(outputs["values"][entry], recorded["values"][entry], entry))}
    assert not differing, f"{len(differing)} entries differ beyond rounding: {differing}"


def test_outputs_are_the_recorded_ones_bit_for_bit_on_the_recording_machine(outputs, recorded):
    if outputs["machine"] != recorded["machine"]:
        pytest.skip(f"recorded on {recorded['machine']!r}, this is {outputs['machine']!r}")
    assert outputs["exact"].keys() == recorded["exact"].keys()
    for key in recorded["exact"]:
        got, want = outputs["exact"][key], recorded["exact"][key]
        if isinstance(want, dict):
            assert got.keys() == want.keys(), f"{key}: other entries {sorted(set(got) ^ set(want))}"
            differing = [k for k in want if got[k] != want[k]]
            assert not differing, f"{key}: {len(differing)} differ, first {differing[:5]}"
        else:
            assert got == want, f"{key} differs"
