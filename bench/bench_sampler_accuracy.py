"""Sampler accuracy with an exact noise predictor, on the linear and the cosine schedule.

    python bench/bench_sampler_accuracy.py

For Gaussian data N(0.3, 0.5^2) in 12 dimensions the probability-flow ODE map from x_T has a closed
form; for a two-bump Gaussian mixture the reference is DDIM over all T steps. With the exact noise
prediction the only error left is the sampler's discretisation. Rows marked "full range" spread
DPM-Solver++'s logsnr grid down to lambda at T - 1 even where the schedule's last step alone drops
lambda by more than the spacing (the cosine schedule's beta capped at 0.999): the grid before that
was cut off. Prints one Markdown table.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import train_ddpm as td  # noqa: E402
from test_fast_samplers import MixturePredictor, exact_ode_map_for_a_gaussian  # noqa: E402


def errors(diffusion, sampler, steps, spacing=None):
    mu, s = 0.3, 0.5
    gaussian = MixturePredictor(diffusion, [[mu] * 12], [s], [1.0])
    x_T = torch.randn((2000, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_map_for_a_gaussian(diffusion, x_T, mu, s)
    means = np.random.default_rng(1).uniform(-0.7, 0.7, size=(2, 12))
    mixture = MixturePredictor(diffusion, means, [0.1, 0.2], [0.3, 0.7])
    x_mix = torch.randn((1000, 3, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run(predictor, x, sampler, steps):
        return diffusion.sample(predictor, x.shape, td.SamplingSpec(sampler, steps, spacing or "", clip_x0="none"), noise=x)
    reference = run(mixture, x_mix, "ddim", diffusion.num_timesteps)
    return ((run(gaussian, x_T, sampler, steps) - exact).abs().max().item(),
            (run(mixture, x_mix, sampler, steps) - reference).pow(2).mean().sqrt().item())


def full_range_grid_end(log_snr, steps):
    return len(log_snr) - 1


def main():
    torch.set_num_threads(1)
    print("| schedule | sampler | steps | grid | Gaussian: max abs error vs exact ODE | mixture: RMS vs DDIM over all T |")
    print("|---|---|---|---|---|---|")
    for kind in ("linear", "cosine"):
        diffusion = td.GaussianDiffusion(td.make_beta_schedule(kind, 1000))
        rows = [("ddim", 20, "uniform", False), ("ddim", 100, "uniform", False)]
        rows += [("dpmpp2m", k, "logsnr", full) for k in (10, 20, 50) for full in (False, True)]
        for sampler, steps, spacing, full in rows:
            if full and kind == "linear":
                continue  # the linear schedule has no such last step: both grids are the same
            grid_end = td._logsnr_grid_end
            td._logsnr_grid_end = full_range_grid_end if full else grid_end
            try:
                gaussian, mix = errors(diffusion, sampler, steps, spacing)
            finally:
                td._logsnr_grid_end = grid_end
            label = spacing + (" (full range, before)" if full else "")
            print(f"| {kind} T=1000 | {sampler} | {steps} | {label} | {gaussian:.4f} | {mix:.4f} |", flush=True)


if __name__ == "__main__":
    main()
