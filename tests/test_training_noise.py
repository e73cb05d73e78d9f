"""Where training spends its noise levels (--t_sampling) and DDPM-IP's input perturbation
(--input_perturbation): the densities against the papers' closed forms, the draws against their
table, the perturbed loss against Ning et al.'s Algorithm 1, and the flags through the real CLI."""

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


def test_logitnormal_is_sd3s_density_of_the_rectified_flow_time():
    """SD3 (Esser et al. 2024): the rectified flow x = (1 - t) x_0 + t eps has logit(t) ~ N(0, 1). The
    VP latent at abar is that flow's point with t / (1 - t) = sigma, scaled by sqrt(abar)."""
    diffusion = fine_cosine_diffusion()
    abar = diffusion.alphas_cumprod_host
    sigma = np.sqrt((1 - abar) / abar)
    t_flow = sigma / (1 + sigma)
    p = td.timestep_probabilities(abar, td.T_SAMPLING["logitnormal"])
    mean, std = weighted_moments(np.log(t_flow / (1 - t_flow)), p)
    assert mean == pytest.approx(0.0, abs=2e-3) and std == pytest.approx(1.0, abs=2e-3)


def test_a_timestep_gets_the_normal_mass_between_the_midpoints_to_its_neighbours():
    abar = np.array([0.9, 0.5, 0.1])  # log-SNR 2.197, 0, -2.197: edges +inf, 1.0986, -1.0986, -inf
    p = td.timestep_probabilities(abar, (0.0, 1.0))
    phi = 0.5 * (1 + math.erf(math.log(9) / 2 / math.sqrt(2)))  # Phi(log(9) / 2 = 1.0986)
    assert p == pytest.approx([1 - phi, 2 * phi - 1, 1 - phi], abs=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "logitnormal"])
def test_the_drawn_timesteps_follow_their_table(kind):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 40, 2.5e-3, 0.5))
    noise = td.TrainingNoise(diffusion, kind)
    t, _, _ = noise.draw((200_000, 1, 1, 1), slice(None), torch.Generator(), seed=3, step=0)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 40
    counts = np.bincount(t.numpy(), minlength=40)
    want = 200_000 * td.timestep_probabilities(diffusion.alphas_cumprod_host, td.T_SAMPLING[kind])
    assert np.abs(counts - want).max() < 5 * np.sqrt(want.max()) + 5  # within 5 standard deviations


def test_uniform_draws_are_what_training_drew_before_the_options_existed():
    """Old runs resume onto the same timesteps and noise: uniform draws randint, then randn, from (seed, step)."""
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    g = torch.Generator().manual_seed(td.derived_seed(1, 7, td.BATCH_NOISE))
    t_old, noise_old = torch.randint(0, 100, (8,), generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t, noise, perturbation = td.TrainingNoise(diffusion).draw((8, 3, 4, 4), slice(None), torch.Generator(), 1, 7)
    assert torch.equal(t, t_old) and torch.equal(noise, noise_old) and perturbation is None


def test_input_perturbation_adds_gamma_xi_and_leaves_timesteps_and_noise_as_they_were():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    g = torch.Generator()
    plain = td.TrainingNoise(diffusion).draw((64, 3, 8, 8), slice(None), g, 2, 5)
    t, noise, perturbation = td.TrainingNoise(diffusion, input_perturbation=0.1).draw((64, 3, 8, 8), slice(None), g, 2, 5)
    assert torch.equal(t, plain[0]) and torch.equal(noise, plain[1])
    assert perturbation.std().item() == pytest.approx(0.1, rel=0.05)
    assert abs(torch.corrcoef(torch.stack([perturbation.flatten(), noise.flatten()]))[0, 1].item()) < 0.05


def test_each_rank_draws_its_slice_of_the_perturbed_global_batch():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    noise = td.TrainingNoise(diffusion, "logitnormal", 0.1)
    g = torch.Generator()
    whole = noise.draw((8, 3, 4, 4), slice(None), g, seed=1, step=7)
    halves = [noise.draw((8, 3, 4, 4), td.Processes(r, 2).shard(8), g, 1, 7) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])


def test_the_perturbed_loss_feeds_x_t_of_the_perturbed_noise_and_targets_the_noise_alone():
    """Ning et al. 2023, Algorithm 1: y_t = sqrt(abar) x_0 + sqrt(1 - abar) (eps + gamma xi), loss
    ||eps - eps_theta(y_t, t)||^2."""
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    gen = torch.Generator().manual_seed(0)
    x_start, noise = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(4, 3, 8, 8, generator=gen)
    perturbation, t = 0.1 * torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 30, 60, 99])
    seen = []

    def model(x_t, t):
        seen.append(x_t)
        return torch.zeros_like(x_t)

    losses = diffusion.training_losses(model, x_start, t, noise, None, perturbation)
    abar = torch.from_numpy(diffusion.alphas_cumprod_host[t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen[0], abar.sqrt() * x_start + (1 - abar).sqrt() * (noise + perturbation))
    torch.testing.assert_close(losses, noise.square().mean(dim=(1, 2, 3)))  # the zero predictor's closed form

    def exact(x_t, t):  # the noise of x_t: what an exact predictor of the unperturbed problem returns
        return (x_t - abar.sqrt() * x_start) / (1 - abar).sqrt()

    torch.testing.assert_close(diffusion.training_losses(exact, x_start, t, noise, None, perturbation),
                               perturbation.square().mean(dim=(1, 2, 3)))


def test_a_perturbed_step_in_micro_batches_is_the_whole_batchs_update():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 20, 5e-3, 0.999))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=gen) * 2 - 1
    t, noise, perturbation = td.TrainingNoise(diffusion, "lognormal", 0.1).draw((8, 3, 8, 8), slice(None), gen, 0, 0)
    weights = []
    for k in (1, 2):
        torch.manual_seed(0)
        model = td.UNet(td.Config(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, emb_dim=16, norm_groups=2,
                                  dropout=0.0, image_size=8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        _, losses, bad = td.train_step(model, diffusion, td.Batch(x, t, noise, None, perturbation), optimizer, scaler,
                                       0.0, micro_batches=k)
        assert not bad
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("flags, fragments", [
    (["--input_perturbation", "-0.1"], ["--input_perturbation must be in [0, 1)"]),
    (["--input_perturbation", "1.5"], ["--input_perturbation must be in [0, 1)"]),
    (["--t_sampling", "gaussian"], ["--t_sampling", "lognormal"]),
])
def test_bad_noise_options_are_refused_in_one_line_before_anything_is_written(flags, fragments, tmp_path):
    result = run_cli(*TINY, *flags, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "checkpoints").exists()
