"""Where training spends its noise levels (--t_sampling): the density against EDM's closed form,
the draws against their table, resume and DDP slicing, and the flag through the real CLI."""

import math

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import TINY, assert_one_line_error, run_cli


def fine_cosine_diffusion(T=20_000):
    """A long cosine chain: its log-SNR runs from about +16 to -20 in small steps, so a density over
    it is barely discretised."""
    return td.GaussianDiffusion(td.make_beta_schedule("cosine", T))


def weighted_moments(values, probs):
    mean = float((probs * values).sum())
    return mean, float(np.sqrt((probs * (values - mean) ** 2).sum()))


def test_uniform_sampling_gives_every_timestep_one_in_t():
    p = td.timestep_probabilities(np.linspace(0.999, 0.001, 50), None)
    assert np.allclose(p, 1 / 50) and p.sum() == pytest.approx(1)


def test_lognormal_is_edms_log_sigma_density():
    """EDM (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean = -1.2, P_std = 1.2), with sigma the
    noise-to-signal ratio of the VP latent, sqrt((1 - abar) / abar)."""
    diffusion = fine_cosine_diffusion()
    abar = diffusion.alphas_cumprod_host
    p = td.timestep_probabilities(abar, td.T_SAMPLING["lognormal"])
    assert p.sum() == pytest.approx(1, abs=1e-12) and (p >= 0).all()
    mean, std = weighted_moments(0.5 * np.log((1 - abar) / abar), p)
    assert mean == pytest.approx(-1.2, abs=2e-3) and std == pytest.approx(1.2, abs=2e-3)


def test_a_timestep_gets_the_normal_mass_between_the_midpoints_to_its_neighbours():
    abar = np.array([0.9, 0.5, 0.1])  # log-SNR 2.197, 0, -2.197: edges +inf, 1.0986, -1.0986, -inf
    p = td.timestep_probabilities(abar, (0.0, 1.0))
    phi = 0.5 * (1 + math.erf(math.log(9) / 2 / math.sqrt(2)))  # Phi(log(9) / 2 = 1.0986)
    assert p == pytest.approx([1 - phi, 2 * phi - 1, 1 - phi], abs=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "lognormal"])
def test_the_drawn_timesteps_follow_their_table(kind):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 40, 2.5e-3, 0.5))
    noise = td.TrainingNoise(diffusion, kind)
    t, _ = noise.draw((200_000, 1, 1, 1), slice(None), torch.Generator(), seed=3, step=0)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 40
    counts = np.bincount(t.numpy(), minlength=40)
    want = 200_000 * td.timestep_probabilities(diffusion.alphas_cumprod_host, td.T_SAMPLING[kind])
    assert np.abs(counts - want).max() < 5 * np.sqrt(want.max()) + 5  # within 5 standard deviations


def test_uniform_draws_are_what_training_drew_before_the_options_existed():
    """Old runs resume onto the same timesteps and noise: uniform draws randint, then randn, from (seed, step)."""
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    g = torch.Generator().manual_seed(td.derived_seed(1, 7, td.BATCH_NOISE))
    t_old, noise_old = torch.randint(0, 100, (8,), generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t, noise = td.TrainingNoise(diffusion).draw((8, 3, 4, 4), slice(None), torch.Generator(), 1, 7)
    assert torch.equal(t, t_old) and torch.equal(noise, noise_old)


def test_each_rank_draws_its_slice_of_the_log_normal_global_batch():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    noise = td.TrainingNoise(diffusion, "lognormal")
    g = torch.Generator()
    whole = noise.draw((8, 3, 4, 4), slice(None), g, seed=1, step=7)
    halves = [noise.draw((8, 3, 4, 4), td.Processes(r, 2).shard(8), g, 1, 7) for r in range(2)]
    for i in range(2):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])


def test_an_unknown_density_is_refused_in_one_line_before_anything_is_written(tmp_path):
    result = run_cli(*TINY, "--t_sampling", "gaussian", cwd=tmp_path)
    assert_one_line_error(result, "--t_sampling", "lognormal")
    assert not (tmp_path / "checkpoints").exists()
