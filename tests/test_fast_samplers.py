"""DPM-Solver++(2M) and the timestep spacings, checked with exact noise predictors.

For data that is a mixture of isotropic Gaussians N(m_k, s_k^2 I) with weights w_k, every marginal
q(x_t) is again such a mixture, so the optimal noise prediction E[eps | x_t] has a closed form; the
samplers' only error is then their discretisation of the reverse process.
"""

import math

import numpy as np
import pytest
import torch

import train_ddpm as td

T = 1000


class MixturePredictor:
    """eps*(x_t, t) = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar) for a Gaussian-mixture data law."""

    def __init__(self, diffusion, means, stds, weights):
        self.abar = diffusion.alphas_cumprod  # float64 [T]
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.vars = torch.as_tensor(stds, dtype=torch.float64) ** 2  # (K,)
        self.log_w = torch.as_tensor(weights, dtype=torch.float64).log()

    def __call__(self, x_t, t):
        shape = x_t.shape
        x = x_t.reshape(shape[0], -1).double()  # (B, D)
        a = self.abar[t].view(-1, 1, 1)  # (B, 1, 1)
        var_t = a * self.vars.view(1, -1, 1) + (1 - a)  # (B, K, 1) variance of component k at time t
        diff = x[:, None, :] - a.sqrt() * self.means[None]  # (B, K, D)
        d = x.shape[1]
        log_p = self.log_w - 0.5 * (diff ** 2).sum(-1) / var_t[..., 0] - 0.5 * d * var_t[..., 0].log()
        resp = torch.softmax(log_p, dim=1)[..., None]  # (B, K, 1)
        x0_given_k = self.means[None] + a.sqrt() * self.vars.view(1, -1, 1) / var_t * diff
        x0 = (resp * x0_given_k).sum(1)
        eps = (x - a[:, 0].sqrt() * x0) / (1 - a[:, 0]).sqrt()
        return eps.reshape(shape).to(x_t.dtype)


def linear_diffusion():
    return td.GaussianDiffusion(td.make_beta_schedule("linear", T))


def exact_ode_map_for_a_gaussian(diffusion, x_T, mu, s):
    """The probability-flow ODE keeps z = (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar) fixed;
    from the last step it ends at t = 0 and its final denoising gives E[x0 | x at t=0]."""
    abar_T, abar_0 = diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod[0]
    z = (x_T - abar_T.sqrt() * mu) / (abar_T * s ** 2 + 1 - abar_T).sqrt()
    x_0 = abar_0.sqrt() * mu + (abar_0 * s ** 2 + 1 - abar_0).sqrt() * z
    return mu + abar_0.sqrt() * s ** 2 / (abar_0 * s ** 2 + 1 - abar_0) * (x_0 - abar_0.sqrt() * mu)


def run(diffusion, predictor, sampler, steps, x_T, **kw):
    return diffusion.sample(predictor, x_T.shape, td.SamplingSpec(sampler, steps, clip_x0="none", **kw), noise=x_T)


def test_dpm_solver_at_20_steps_is_as_close_to_the_exact_ode_solution_as_ddim_at_100_for_gaussian_data():
    diffusion = linear_diffusion()
    mu, s = 0.3, 0.5
    predictor = MixturePredictor(diffusion, [[mu] * 12], [s], [1.0])
    x_T = torch.randn((2000, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_map_for_a_gaussian(diffusion, x_T, mu, s)
    error = {}
    for sampler, steps in (("dpmpp2m", 20), ("ddim", 100), ("ddim", 20)):
        error[sampler, steps] = (run(diffusion, predictor, sampler, steps, x_T) - exact).abs().max().item()
    assert error["dpmpp2m", 20] <= error["ddim", 100], error
    assert error["dpmpp2m", 20] < 0.2 * error["ddim", 20], error  # second order beats first at equal cost
    assert error["dpmpp2m", 20] < 0.05, error  # in pixels of a [-1, 1] image


def test_logsnr_steps_are_evenly_spread_in_lambda():
    diffusion = linear_diffusion()
    ts = td.strided_timesteps(T, 20, "logsnr", diffusion.alphas_cumprod)
    abar = diffusion.alphas_cumprod[ts]
    steps = (abar / (1 - abar)).log().diff().abs()
    assert ts[0] == 0 and ts[-1] == T - 1
    assert steps.max() / steps.min() < 1.5, steps  # even up to the rounding to whole timesteps


def test_dpm_solver_at_20_steps_lands_as_close_to_a_mixture_as_ddim_at_100():
    """A two-bump mixture makes the ODE nonlinear; the reference is DDIM over all 1000 steps."""
    diffusion = linear_diffusion()
    rng = np.random.default_rng(1)
    means = rng.uniform(-0.7, 0.7, size=(2, 12))
    predictor = MixturePredictor(diffusion, means, [0.1, 0.2], [0.3, 0.7])
    x_T = torch.randn((1000, 3, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = run(diffusion, predictor, "ddim", T, x_T)
    dpm20 = (run(diffusion, predictor, "dpmpp2m", 20, x_T) - reference).pow(2).mean().sqrt().item()
    ddim100 = (run(diffusion, predictor, "ddim", 100, x_T) - reference).pow(2).mean().sqrt().item()
    assert dpm20 <= ddim100, (dpm20, ddim100)
    # and the samples belong to the right bumps in the right shares
    samples = run(diffusion, predictor, "dpmpp2m", 20, x_T).reshape(len(x_T), -1).numpy()
    nearest = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
    share = (nearest == 1).mean()
    assert abs(share - 0.7) < 4.5 * math.sqrt(0.7 * 0.3 / len(x_T)), share


def test_one_step_dpm_solver_and_ddim_agree_on_the_first_step():
    # DPM-Solver++'s first-order step is DDIM (Lu et al. 2022, sec. 4); with two timesteps both
    # samplers make one such step and then return x0_hat.
    diffusion = linear_diffusion()
    predictor = MixturePredictor(diffusion, [[0.2] * 4], [0.4], [1.0])
    x_T = torch.randn((64, 1, 2, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(run(diffusion, predictor, "dpmpp2m", 2, x_T), run(diffusion, predictor, "ddim", 2, x_T),
                          atol=1e-10)


def test_dpm_solver_clips_its_data_prediction_when_asked():
    diffusion = linear_diffusion()
    predictor = MixturePredictor(diffusion, [[3.0] * 4], [0.1], [1.0])  # data far outside [-1, 1]
    x_T = torch.randn((16, 1, 2, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clipped = diffusion.sample(predictor, x_T.shape, td.SamplingSpec("dpmpp2m", 10), noise=x_T)
    assert clipped.abs().max() <= 1.0
    assert run(diffusion, predictor, "dpmpp2m", 10, x_T).mean() > 2.5


def imagen_dynamic_threshold(x0, percentile=99.5):
    """Saharia et al. 2022, sec. 2.3, written with numpy: per image, s = max(percentile of |x0|, 1),
    then clip to [-s, s] and divide by s."""
    out = np.empty_like(x0)
    for i, image in enumerate(x0):
        s = max(np.percentile(np.abs(image), percentile), 1.0)
        out[i] = np.clip(image, -s, s) / s
    return out


def test_dynamic_thresholding_is_imagens_rule_per_image():
    rng = np.random.default_rng(0)
    x0 = np.stack([rng.uniform(-0.9, 0.9, (3, 8, 8)),  # in range: left as it is
                   3.0 * rng.standard_normal((3, 8, 8)),  # out of range: shrunk
                   np.concatenate([np.full(191, 1.5), [10.0]]).reshape(3, 8, 8)])  # one outlier: clamped to s
    got = td.clip_xstart(torch.from_numpy(x0), "dynamic").numpy()
    np.testing.assert_allclose(got, imagen_dynamic_threshold(x0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[0], x0[0])
    s = 1.5 + (0.995 * 191 - 190) * (10.0 - 1.5)  # the 99.5th percentile, interpolated between the top two
    np.testing.assert_allclose(got[2].ravel(), np.r_[np.full(191, 1.5 / s), 1.0], rtol=1e-12)
    assert np.abs(got).max() <= 1.0
    assert td.clip_xstart(torch.from_numpy(x0), "static").equal(torch.from_numpy(x0).clamp(-1, 1))
    assert td.clip_xstart(torch.from_numpy(x0), "none").equal(torch.from_numpy(x0))
    with pytest.raises(ValueError):
        td.clip_xstart(torch.from_numpy(x0), "percentile")


def test_dynamic_thresholding_shrinks_an_amplified_noise_prediction_instead_of_saturating_it():
    # At t = T - 1 an eps error e becomes e * sigma / alpha (157 on the linear schedule) in x0:
    # static clipping turns that into +-1 almost everywhere, dynamic keeps it as noise of std
    # 1 / z_0.9975 = 1 / 2.807 (the 99.5th percentile of |N(0, 1)|).
    x0 = 157 * torch.randn((8, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    static, dynamic = td.clip_xstart(x0, "static"), td.clip_xstart(x0, "dynamic")
    assert static.square().mean() > 0.99
    assert dynamic.std().item() == pytest.approx(1 / 2.807, rel=0.03)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_thresholding_leaves_the_samples_of_an_exact_predictor_for_in_range_data_unchanged(sampler):
    # For data on a few points inside [-1, 1], E[x0 | x_t] is a weighted mean of the points and stays
    # inside too, so neither rule may change the samples (DDIM recomputes eps from x0: float rounding).
    diffusion = linear_diffusion()
    predictor = MixturePredictor(diffusion, [[0.6] * 4, [-0.5] * 4, [0.9, -0.9, 0.2, -0.1]], [0.0] * 3, [1 / 3] * 3)
    x_T = torch.randn((256, 1, 2, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    runs = {clip: diffusion.sample(predictor, x_T.shape, td.SamplingSpec(sampler, 20, clip_x0=clip), noise=x_T,
                                   generator=torch.Generator().manual_seed(8))
            for clip in ("none", "static", "dynamic")}
    assert runs["none"].abs().max() < 1
    assert torch.allclose(runs["dynamic"], runs["none"], rtol=0, atol=1e-12)
    assert torch.allclose(runs["static"], runs["none"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing", td.TIMESTEP_SPACINGS)
def test_every_spacing_gives_k_distinct_increasing_steps_ending_at_the_last_step(spacing):
    for num_timesteps in (2, 7, 50, 1000):
        for steps in sorted({1, 2, min(3, num_timesteps), num_timesteps // 2 or 1, num_timesteps - 1 or 1, num_timesteps}):
            alphas_cumprod = torch.cumprod(1 - td.make_beta_schedule("linear", num_timesteps), 0)
            ts = td.strided_timesteps(num_timesteps, steps, spacing, alphas_cumprod)
            assert len(ts) == steps and ts.dtype == torch.long
            assert (ts.diff() > 0).all() and ts.min() >= 0 and ts[-1] == num_timesteps - 1, (num_timesteps, steps)


def test_spacings_follow_their_definitions():
    assert td.strided_timesteps(1000, 10, "trailing").tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    quad = td.strided_timesteps(1000, 11, "quadratic").tolist()
    assert quad == [round(999 * (i / 10) ** 2) for i in range(11)]
    assert td.strided_timesteps(1000, 4, "uniform").tolist() == [0, 333, 666, 999]
    with pytest.raises(ValueError):
        td.strided_timesteps(1000, 10, "leading")
    with pytest.raises(ValueError):
        td.strided_timesteps(1000, 10, "logsnr")  # needs the schedule


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
@pytest.mark.parametrize("spacing", ["quadratic", "trailing"])
def test_every_sampler_with_every_spacing_reproduces_gaussian_data(sampler, spacing):
    diffusion = linear_diffusion()
    mu, s = -0.2, 0.4
    predictor = MixturePredictor(diffusion, [[mu] * 4], [s], [1.0])
    x_T = torch.randn((4000, 1, 2, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    samples = diffusion.sample(predictor, x_T.shape, td.SamplingSpec(sampler, 50, spacing, clip_x0="none"), noise=x_T,
                               generator=torch.Generator().manual_seed(6))
    # 50 steps: the discretisation costs a few percent of the spread; the mean stays put
    assert abs(samples.mean().item() - mu) < 0.01
    assert abs(samples.std().item() / s - 1) < 0.1, samples.std().item()


# --- The logsnr grid on the cosine schedule, whose last beta is capped at 0.999 -----------------------

def unclipped_logsnr_timesteps(alphas_cumprod, steps):
    """The logsnr rule without a clip, written out: points evenly spread in lambda from t = 0 to
    t = T - 1, each rounded to the nearest step, pushed apart, the last at T - 1."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    log_snr = (alphas_cumprod / (1 - alphas_cumprod)).log()
    targets = log_snr[0] + torch.linspace(0, 1, steps, dtype=torch.float64) * (log_snr[-1] - log_snr[0])
    ts = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    last = len(log_snr) - 1
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = last
    for i in range(steps - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def with_unclipped_logsnr(monkeypatch):
    """Make the samplers' logsnr spacing the unclipped rule (the other spacings as they are)."""
    grid = td.timestep_grid

    def unclipped(num_timesteps, steps, spacing="uniform", alphas_cumprod=None):
        if spacing != "logsnr":
            return grid(num_timesteps, steps, spacing, alphas_cumprod)
        return unclipped_logsnr_timesteps(alphas_cumprod, steps)

    monkeypatch.setattr(td, "timestep_grid", unclipped)


@pytest.mark.parametrize("num_timesteps", [100, 1000])
def test_logsnr_steps_bring_dpm_solver_closer_to_the_exact_ode_map_on_the_cosine_schedule(num_timesteps, monkeypatch):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("cosine", num_timesteps))
    mu, s = 0.3, 0.5
    predictor = MixturePredictor(diffusion, [[mu] * 12], [s], [1.0])
    x_T = torch.randn((2000, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode_map_for_a_gaussian(diffusion, x_T, mu, s)
    rng = np.random.default_rng(1)  # and a two-bump mixture against DDIM over all T steps
    means = rng.uniform(-0.7, 0.7, size=(2, 12))
    mixture = MixturePredictor(diffusion, means, [0.1, 0.2], [0.3, 0.7])
    x_T_mix = torch.randn((1000, 3, 2, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = run(diffusion, mixture, "ddim", num_timesteps, x_T_mix)

    def errors():
        gaussian = (run(diffusion, predictor, "dpmpp2m", 20, x_T) - exact).abs().max().item()
        mix = (run(diffusion, mixture, "dpmpp2m", 20, x_T_mix) - reference).pow(2).mean().sqrt().item()
        return gaussian, mix

    ours = errors()
    with monkeypatch.context() as patch:
        with_unclipped_logsnr(patch)
        unclipped = errors()
    # T=1000: 0.042 vs 0.064 and 0.0151 vs 0.0190; T=100: 0.018 vs 0.039 and 0.0098 vs 0.0150
    assert ours[0] < 0.8 * unclipped[0], (ours, unclipped)
    assert ours[1] < 0.9 * unclipped[1], (ours, unclipped)


def test_logsnr_steps_of_schedules_without_a_capped_beta_are_those_of_the_unclipped_rule():
    schedules = [(1000, 1e-4, 0.02, (2, 3, 5, 10, 20, 25, 50, 100, 250, 500, 900)),  # the paper's
                 (100, 1e-3, 0.2, (2, 5, 10, 20, 50, 75))]  # quick_test's
    for num_timesteps, beta_start, beta_end, step_counts in schedules:
        betas = td.make_beta_schedule("linear", num_timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        for steps in step_counts:
            ts = td.strided_timesteps(num_timesteps, steps, "logsnr", alphas_cumprod)
            assert ts.tolist() == unclipped_logsnr_timesteps(alphas_cumprod, steps), (num_timesteps, steps)
    # a schedule whose last beta is 0.999 changes, and still gives K distinct steps ending at T - 1
    alphas_cumprod = torch.cumprod(1 - td.make_beta_schedule("linear", 20, 0.005, 0.999), 0)
    for steps in range(1, 21):
        ts = td.strided_timesteps(20, steps, "logsnr", alphas_cumprod)
        assert len(ts) == steps and (ts.diff() > 0).all() and ts[0] >= 0 and ts[-1] == 19, (steps, ts)
