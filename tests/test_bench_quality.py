"""bench/bench_quality.py end to end at a toy budget: every installed contender trains, samples and is
scored; the table has its rows and the picture its panels. The numbers are not checked here (they are
measured in BENCHMARKS.md); that every row is made the way the script says is."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from test_cli import OFFLINE, assert_one_line_error, describe

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_quality.py"
FID_WEIGHTS = REPO.parent / "shared" / "fid" / "pt_inception-2015-12-05-fc-zeroed.pth"
CIFAR_STATS = REPO.parent / "shared" / "fid" / "cifar10-jpeg75-train-stats.npz"
TOY_UNET = "--base_channels 8 --channel_mults 1,2 --emb_dim 16 --norm_groups 2"


def run_bench(*args, cwd):
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=cwd, env={**__import__("os").environ,
                          **OFFLINE}, capture_output=True, text=True, timeout=900)


def image_folder(root, per_class=64):
    """Two classes of 32x32 images (a coloured field with a square), 128 in all: lucidrains' Trainer
    wants at least 100, the paper recipe's batch is 128."""
    rng = np.random.default_rng(0)
    for channel, name in ((0, "red"), (2, "blue")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = np.zeros((32, 32, 3), np.uint8)
            image[..., channel] = rng.integers(100, 255)
            image[8:24, 8:24] = rng.integers(0, 255, 3)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def table_rows(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = lines[0], lines[1:]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    return names, [dict(zip(names, (cell.strip() for cell in line.strip("|").split("|")))) for line in rows]


def test_the_race_trains_samples_and_scores_every_installed_contender_and_draws_them_side_by_side(tmp_path):
    data = image_folder(tmp_path / "data")
    score = FID_WEIGHTS.is_file() and CIFAR_STATS.is_file() and importlib.util.find_spec("pytorch_fid") is not None
    # Scored the way BENCHMARKS.md's race is: against saved statistics, KID against a few training images.
    scoring = ["--fid_weights", FID_WEIGHTS, "--reference_stats", CIFAR_STATS, "--kid_images", 20]
    # ours also from its power EMA rebuilt after training, and autoguided by its own epoch-1 checkpoint
    ema = "--ema_profiles 0.05,0.1 --ema_snapshot_every 64"
    args = ["--data_dir", data, "--images", 256, "--num_samples", 10, "--preset", "quick_test",
            "--train_flags", f"{TOY_UNET} --timesteps 1000 --beta_start 1e-4 --beta_end 0.02 {ema}", "--real_dir",
            data, "--ema_length", 0.05, "--guide_epoch", 1, "--guidance_scales", 2.5, "--out", "race"]
    result = run_bench(*args, *(scoring if score else ["--no_fid"]), cwd=tmp_path)
    assert result.returncode == 0, describe(result)

    names, rows = table_rows((tmp_path / "race" / "race.md").read_text())
    assert names == ["contender", "parameters", "training images", "wall time", "train images/s", "sampler",
                     "sampling s", "FID@10", "KID x1e3", "mean saturation"]
    peers = {"diffusers": importlib.util.find_spec("diffusers"),
             "denoising-diffusion-pytorch": importlib.util.find_spec("denoising_diffusion_pytorch")}
    want = [("real images (data): the floor", "-", "-"),
            *[("ours (quick_test)", "256 (4 x 64)", sampler) for sampler in (
                "ddim 50", "dpmpp2m 20", "dpmpp2m 20, EMA 0.05",
                "dpmpp2m 20, EMA 0.05, autoguided by epoch 1, w 2.5")],
            ("ours, ddpm_paper recipe", "256 (2 x 128)", "ddim 50")]
    want += [("diffusers (train_unconditional.py)", "256 (16 x 16)", "ddim 50")] * bool(peers["diffusers"])
    want += [("denoising-diffusion-pytorch", "256 (16 x 16)", "ddim 50")] * bool(peers["denoising-diffusion-pytorch"])
    assert [(r["contender"], r["training images"], r["sampler"]) for r in rows] == want
    # ours, its paper-recipe twin and diffusers' UNet2DModel are one architecture: exactly the same size
    same_size = [r["parameters"] for r in rows[1:] if not r["contender"].startswith("denoising")]
    assert len(set(same_size)) == 1 and same_size[0].endswith("(1.00x)")
    for row in rows:
        assert 0 <= float(row["mean saturation"]) <= 255
        if score:
            assert float(row["FID@10"]) >= 0 and re.fullmatch(r"-?\d+\.\d\d \+- \d+\.\d\d", row["KID x1e3"])
    # the real row measures 10 of the folder's images: its saturation lies within theirs
    real = np.stack([np.asarray(Image.open(p)) for p in sorted(data.rglob("*.png"))])
    per_image = (real.max(-1).astype(float) - real.min(-1)).mean(axis=(1, 2))
    assert per_image.min() <= float(rows[0]["mean saturation"]) <= per_image.max()

    # the sampler named its files after the weights and the guide it used; from the same noise, the
    # power EMA and then the guide changed the images
    ours = json.loads((tmp_path / "race" / "ours" / "result.json").read_text())["rows"]
    files = {path.parent.name: path.stem for path in (tmp_path / "race" / "ours").glob("*/*.npz")}
    assert files["dpmpp2m-20-EMA-0-05"] == "samples_dpmpp2m20_ema0.05_seed0"
    assert files["dpmpp2m-20-EMA-0-05-autoguided-by-epoch-1-w-2-5"] == \
        "samples_dpmpp2m20_guide-ddpm_ts1000_epoch0001_ema0.05_w2.5_ema0.05_seed0"
    images = [np.load(tmp_path / "race" / r["samples"])["arr_0"].astype(int) for r in ours]
    assert (images[2] != images[1]).any() and (images[3] != images[2]).any()

    picture = Image.open(tmp_path / "race" / "race.png")
    panels = len(rows)  # three to a line, 10 x 5 images of 32 px under a 16 px label, 8 px apart
    assert picture.size == (3 * 320 + 2 * 8, -(-panels // 3) * (160 + 16 + 8) - 8)

    # a rerun with the same settings reuses every finished contender instead of training it again
    again = run_bench(*args, "--no_fid", "--contenders", "ours,ours_paper", cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert "ours: reusing" in again.stdout and "ours_paper: reusing" in again.stdout
    assert "=== ours" not in again.stdout


def test_an_unknown_contender_or_a_guide_without_its_ema_is_one_line_of_error(tmp_path):
    result = run_bench("--data_dir", tmp_path, "--contenders", "ours,nope", cwd=tmp_path)
    assert_one_line_error(result, "nope", "lucidrains")
    result = run_bench("--data_dir", tmp_path, "--guide_epoch", 1, cwd=tmp_path)
    assert_one_line_error(result, "--guide_epoch", "--ema_length")
