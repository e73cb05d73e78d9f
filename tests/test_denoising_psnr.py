"""Denoising quality by noise level on held-out images: the PSNR of the one-step x_0 prediction and
the loss at fixed t, checked on exact predictors; plot_loss.py's panel and plateau verdicts."""

import csv
import math
import re

import numpy as np
import pytest
import torch

import plot_loss
import train_ddpm as td
from test_plot_loss import run_plot


def validator_and_diffusion(T=1000, n=12):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return td.Validator(images, T, seed=3, batch_size=5), td.GaussianDiffusion(td.make_beta_schedule("linear", T))


def test_an_exact_noise_predictor_scores_the_capped_psnr_and_zero_loss_at_every_t():
    validator, diffusion = validator_and_diffusion()
    x0_all = validator.images.float() / 127.5 - 1
    abar = torch.from_numpy(diffusion.alphas_cumprod_host)

    def exact(x_t, t):  # knows the held-out images (batches of 5, in order): returns the true noise
        batch = next(i for i in range(0, len(x0_all), 5) if len(x0_all[i:i + 5]) == len(x_t) and torch.allclose(
            x_t, diffusion.q_sample(x0_all[i:i + 5], t, validator.noise[i:i + 5])))
        a = abar[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0_all[batch:batch + 5]) / (1 - a).sqrt()

    metrics = validator.metrics(exact, diffusion)
    for k in td.DENOISING_T:
        assert metrics[f"psnr_t{k}"] == td.PSNR_CAP
        assert metrics[f"val_loss_t{k}"] < 1e-9
    assert metrics["val_loss"] < 1e-9


def test_the_zero_predictor_scores_the_closed_form():
    """eps = 0 predicts x_0 = x_t / sqrt(abar): an error sqrt((1 - abar) / abar) * noise, so
    PSNR = 10 log10(4 abar / ((1 - abar) mean(noise^2))), and the loss is mean(noise^2)."""
    validator, diffusion = validator_and_diffusion()
    metrics = validator.metrics(lambda x_t, t: torch.zeros_like(x_t), diffusion)
    noise_power = float(validator.noise.double().square().mean())
    for k in td.DENOISING_T:
        abar = diffusion.alphas_cumprod_host[k]
        assert metrics[f"psnr_t{k}"] == pytest.approx(10 * math.log10(4 * abar / ((1 - abar) * noise_power)), abs=1e-4)
        assert metrics[f"val_loss_t{k}"] == pytest.approx(noise_power, rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(noise_power, rel=1e-5)


def test_the_fixed_t_scale_with_the_chain_length():
    validator, _ = validator_and_diffusion(T=100)
    assert validator.denoising_t == [5, 25, 50, 75]
    assert validator_and_diffusion(T=2000)[0].denoising_t == [100, 500, 1000, 1500]


def test_psnr_verdicts_tell_a_rising_curve_from_a_flat_one():
    assert plot_loss.psnr_plateau(np.array([10.0, 12.0, 14.0, 16.0, 18.0, 20.0]))[0] == "still improving"
    assert plot_loss.psnr_plateau(np.array([10.0, 18.0, 19.9, 20.0, 20.02, 20.05]))[0] == "plateaued"
    assert plot_loss.psnr_plateau(np.array([10.0, 11.0]))[0] == "too early"


def test_plot_loss_draws_the_psnr_panel_and_prints_a_verdict_per_noise_level(tmp_path):
    columns = ("step", "epoch", "loss", "lr", "session", "val_loss", *(f"psnr_t{k}" for k in td.DENOISING_T))
    with open(tmp_path / "loss_log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for e in range(1, 9):
            for step in range(e * 100 - 90, e * 100 + 1, 10):
                writer.writerow([step, step / 100, 0.05 + 0.5 * np.exp(-step / 100), 1e-4, 0, "", "", "", "", ""])
            # t = 50 keeps improving by 1 dB an epoch; the others are flat from epoch 2 on
            writer.writerow([e * 100, e, "", "", 0, 0.1, 20 + e, 15 + min(e, 2), 12 + min(e, 2), 9 + min(e, 2)])
    result = run_plot(tmp_path, "--out", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    lines = {k: next(line for line in result.stdout.splitlines() if f"PSNR at t={k} " in line) for k in td.DENOISING_T}
    assert "28.00 dB" in lines[50] and "still improving" in lines[50]
    assert all("plateaued" in lines[k] for k in (250, 500, 750))
    # the loss's own verdict is still the loss's, not the last PSNR's
    assert re.search(r"^plateau check: (still improving|converged|stalled|too early) ", result.stdout, re.M)
    from PIL import Image
    with Image.open(tmp_path / "p.png") as img:
        assert img.size[1] > 1000, "loss, validation and PSNR panels stacked"
