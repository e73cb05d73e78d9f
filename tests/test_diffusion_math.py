"""train_ddpm.py's diffusion maths, samplers, UNet and training utilities, each checked against a closed
form from the papers (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021) computed here
independently, never against the code's own outputs.

The samplers are tested with exact noise predictors: for data that is a few fixed points, or a
Gaussian, the optimal eps(x_t, t) has a closed form, so a correct sampler must reproduce the data
distribution without any training.
"""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_ddpm as td  # noqa: E402

T = 1000
SIGMAS = 4.5  # tolerance for Monte-Carlo checks, in standard errors


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def linear_diffusion(timesteps=T):
    return td.GaussianDiffusion(td.make_beta_schedule("linear", timesteps, 1e-4, 0.02))


def paper_linear_betas(timesteps=T):
    return np.linspace(1e-4, 0.02, timesteps, dtype=np.float64)


def nichol_f(timesteps, s=0.008):
    """f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2 at t = 0..T (Nichol & Dhariwal 2021, eq. 17)."""
    t = np.arange(timesteps + 1, dtype=np.float64)
    return np.cos(((t / timesteps + s) / (1 + s)) * np.pi / 2) ** 2


# --- 1. Beta schedules ------------------------------------------------------------------------------

def test_linear_schedule_is_the_papers_evenly_spaced_betas_in_float64():
    betas = td.make_beta_schedule("linear", T, 1e-4, 0.02)
    assert betas.dtype == torch.float64
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), paper_linear_betas(), rtol=1e-12, atol=0)


def test_cosine_schedule_is_float64_and_alphas_cumprod_follows_nichol_dhariwal_eq_17_where_unclipped():
    betas = td.make_beta_schedule("cosine", T, cosine_s=0.008)
    assert betas.dtype == torch.float64
    assert betas.shape == (T,)
    f = nichol_f(T, 0.008)
    unclipped_betas = 1 - f[1:] / f[:-1]
    clipped = unclipped_betas > 0.999
    assert clipped.any() and clipped[-1], "eq. 17 at T=1000 needs clipping at the last step"
    first_clipped = int(np.argmax(clipped))
    assert clipped[first_clipped:].all(), "clipping happens only at the end of the chain"
    alphas_cumprod = np.cumprod(1 - betas.numpy())
    # alpha_bar at index t is the product up to step t, i.e. the continuous alpha_bar(t + 1) = f(t+1)/f(0).
    np.testing.assert_allclose(alphas_cumprod[:first_clipped], f[1:first_clipped + 1] / f[0], rtol=1e-10)
    assert betas.max().item() <= 0.999
    assert betas.max().item() == pytest.approx(0.999, abs=1e-15)


def test_cosine_schedule_respects_the_offset_s():
    f = nichol_f(100, 0.05)
    betas = td.make_beta_schedule("cosine", 100, cosine_s=0.05).numpy()
    np.testing.assert_allclose(np.cumprod(1 - betas)[:50], f[1:51] / f[0], rtol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_decreases_from_near_one_to_near_zero(kind):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule(kind, T))
    abar = diffusion.alphas_cumprod.numpy()
    assert np.all(np.diff(abar) < 0)
    assert abar[0] > 0.999
    assert abar[-1] < 1e-4


def test_unknown_schedule_raises_value_error():
    with pytest.raises(ValueError):
        td.make_beta_schedule("quadratic", T)


# --- 2. Posterior q(x_{t-1} | x_t, x_0), Ho et al. eqs. 6-7 ----------------------------------------

def test_posterior_variance_is_beta_tilde_of_eq_7():
    diffusion = linear_diffusion()
    betas = paper_linear_betas()
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(diffusion.posterior_variance.numpy(), beta_tilde, rtol=1e-10, atol=0)
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev.numpy(), abar_prev, rtol=1e-12)


def test_posterior_variance_is_zero_at_the_first_step_and_close_to_beta_late_in_the_chain():
    diffusion = linear_diffusion()
    assert diffusion.posterior_variance[0].item() == 0.0
    late = slice(500, T)
    np.testing.assert_allclose(diffusion.posterior_variance[late].numpy(), paper_linear_betas()[late], rtol=1e-3)
    assert torch.all(diffusion.posterior_variance[1:] < diffusion.betas[1:])


def test_posterior_log_variance_is_finite_at_the_first_step_as_in_improved_diffusion():
    diffusion = linear_diffusion()
    logvar = diffusion.posterior_log_variance_clipped.numpy()
    assert np.all(np.isfinite(logvar))
    assert logvar[0] == pytest.approx(math.log(diffusion.posterior_variance[1].item()), rel=1e-12)
    np.testing.assert_allclose(np.exp(logvar[1:]), diffusion.posterior_variance[1:].numpy(), rtol=1e-10)


def bayes_posterior(x0, xt, t, betas):
    """Complete the square in q(x_t | x_{t-1}) q(x_{t-1} | x_0) for scalars:
    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t), q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})."""
    alpha = 1 - betas[t]
    abar_prev = np.prod(1 - betas[:t])
    precision = alpha / betas[t] + 1 / (1 - abar_prev)
    var = 1 / precision
    mean = var * (math.sqrt(alpha) * xt / betas[t] + math.sqrt(abar_prev) * x0 / (1 - abar_prev))
    return mean, var


def numeric_posterior(x0, xt, t, betas, n=400_001):
    """The same posterior by brute-force quadrature of the unnormalised density on a grid."""
    alpha = 1 - betas[t]
    abar_prev = np.prod(1 - betas[:t])
    c1, v1 = xt / math.sqrt(alpha), betas[t] / alpha       # likelihood, as a density in x_{t-1}
    c2, v2 = math.sqrt(abar_prev) * x0, 1 - abar_prev      # prior
    width = 12 * math.sqrt(max(v1, v2))
    grid = np.linspace(min(c1, c2) - width, max(c1, c2) + width, n)
    logp = -(xt - math.sqrt(alpha) * grid) ** 2 / (2 * betas[t]) - (grid - c2) ** 2 / (2 * v2)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum()


@pytest.mark.parametrize("t", [1, 2, 10, 300, 999])
def test_q_posterior_mean_and_variance_equal_bayes_rule_on_scalar_gaussians(t):
    diffusion = linear_diffusion()
    betas = paper_linear_betas()
    x0 = torch.tensor([0.7, -0.4, 0.1], dtype=torch.float64).view(3, 1, 1, 1)
    tt = torch.full((3,), t, dtype=torch.long)
    xt = diffusion.q_sample(x0, tt, torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64).view(3, 1, 1, 1))
    mean, var, logvar = diffusion.q_posterior_mean_variance(x0, xt, tt)
    for i in range(3):
        m_exact, v_exact = bayes_posterior(x0[i].item(), xt[i].item(), t, betas)
        m_num, v_num = numeric_posterior(x0[i].item(), xt[i].item(), t, betas)
        assert m_num == pytest.approx(m_exact, rel=1e-6, abs=1e-9) and v_num == pytest.approx(v_exact, rel=1e-4)
        assert mean[i].item() == pytest.approx(m_exact, rel=1e-10, abs=1e-12)
        assert var[i].item() == pytest.approx(v_exact, rel=1e-10)
        assert logvar[i].item() == pytest.approx(math.log(v_exact), rel=1e-10, abs=1e-10)


def test_q_posterior_at_the_first_step_is_the_clean_image():
    # q(x_{-1} | x_0, x_0-noised) with abar_{-1} = 1: the prior is a point mass at x_0.
    diffusion = linear_diffusion()
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 1, 2, 2)
    t = torch.zeros(3, dtype=torch.long)
    xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert torch.all(var == 0)


def test_p_mean_variance_with_the_true_noise_gives_the_posterior_mean_and_the_chosen_variance():
    diffusion = linear_diffusion()
    betas = paper_linear_betas()
    x0 = torch.tensor([0.5, -0.25, 0.9, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    t = torch.tensor([0, 1, 400, 999])
    noise = torch.tensor([1.0, -0.5, 0.3, -2.0], dtype=torch.float64).view(4, 1, 1, 1)
    xt = diffusion.q_sample(x0, t, noise)
    for var_type in ("fixedlarge", "fixedsmall"):
        mean, logvar, _ = diffusion.p_mean_variance(noise, xt, t, clip_x0="none", var_type=var_type)
        for i, ti in enumerate(t.tolist()):
            if ti == 0:
                assert mean[i].item() == pytest.approx(x0[i].item(), abs=1e-12)
                continue
            m_exact, v_exact = bayes_posterior(x0[i].item(), xt[i].item(), ti, betas)
            assert mean[i].item() == pytest.approx(m_exact, rel=1e-9, abs=1e-11)
            expected_var = betas[ti] if var_type == "fixedlarge" else v_exact
            assert math.exp(logvar[i].item()) == pytest.approx(expected_var, rel=1e-10)


def test_p_mean_variance_clips_the_predicted_clean_image_to_minus_one_one():
    # With a noise prediction that implies x_0 = 3, the clipped mean is the posterior mean for x_0 = 1.
    diffusion = linear_diffusion()
    betas = paper_linear_betas()
    t = torch.tensor([50])
    xt = torch.full((1, 1, 1, 1), 0.8, dtype=torch.float64)
    abar = np.prod(1 - betas[:51])
    eps = (xt - math.sqrt(abar) * 3.0) / math.sqrt(1 - abar)
    mean, _, x_0 = diffusion.p_mean_variance(eps, xt, t, clip_x0="static")
    assert x_0.item() == 1.0
    m_exact, _ = bayes_posterior(1.0, 0.8, 50, betas)
    assert mean.item() == pytest.approx(m_exact, rel=1e-9)


# --- 3. Forward process q(x_t | x_0), Ho et al. eq. 4 -------------------------------------------------

def test_q_sample_at_the_first_step_is_almost_the_clean_image():
    diffusion = linear_diffusion()
    x0 = torch.rand(8, 3, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    xt = diffusion.q_sample(x0, torch.zeros(8, dtype=torch.long), noise)
    # sqrt(1 - beta_0) ~ 0.99995 and sqrt(beta_0) = 0.01.
    assert (xt - x0).abs().max().item() <= 0.01 * noise.abs().max().item() + 1e-4
    torch.testing.assert_close(xt, math.sqrt(1 - 1e-4) * x0 + 0.01 * noise, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_has_mean_sqrt_abar_x0_and_variance_one_minus_abar_over_many_draws(t):
    diffusion = linear_diffusion()
    abar = float(np.prod(1 - paper_linear_betas()[:t + 1]))
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.6, dtype=torch.float64)
    xt = diffusion.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, 1, 1, dtype=torch.float64)).flatten()
    var = 1 - abar
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=SIGMAS * math.sqrt(var / n))
    assert xt.var().item() == pytest.approx(var, abs=SIGMAS * var * math.sqrt(2 / n))


def test_predict_xstart_from_eps_inverts_q_sample_at_every_timestep():
    diffusion = linear_diffusion()
    t = torch.arange(T)
    x0 = torch.rand(T, 2, 2, 2, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    recovered = diffusion.predict_xstart_from_eps(diffusion.q_sample(x0, t, eps), t, eps)
    torch.testing.assert_close(recovered, x0, rtol=0, atol=1e-10)


def test_loss_is_zero_for_an_oracle_that_knows_x0_and_is_the_mse_against_the_noise():
    diffusion = linear_diffusion()
    x0 = torch.rand(16, 1, 3, 3, dtype=torch.float64) * 2 - 1
    abar = torch.tensor(np.cumprod(1 - paper_linear_betas()))

    def oracle(xt, t):  # eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar), exactly the noise q_sample used
        a = abar[t].view(-1, 1, 1, 1)
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    t = torch.randint(0, T, (16,))
    assert diffusion.loss(oracle, x0, t=t, noise=torch.randn_like(x0)).item() == pytest.approx(0, abs=1e-16)
    assert diffusion.loss(oracle, x0).item() == pytest.approx(0, abs=1e-16)  # t and noise drawn inside
    noise = torch.randn_like(x0)
    zero = diffusion.loss(lambda xt, t: torch.zeros_like(xt), x0, t=t, noise=noise)
    assert zero.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-12)


# --- 4. Samplers with exact noise predictors ---------------------------------------------------------

class MixtureEps:
    """The optimal eps for data uniform on K points x_k: q(x_t) is a Gaussian mixture and
    eps*(x_t, t) = (x_t - sqrt(abar_t) E[x_0 | x_t]) / sqrt(1 - abar_t), with
    E[x_0 | x_t] = sum_k softmax_k(-||x_t - sqrt(abar_t) x_k||^2 / (2 (1 - abar_t))) x_k."""

    def __init__(self, points, abar):
        self.points = points.to(torch.float64).flatten(1)   # (K, D)
        self.abar = torch.as_tensor(abar, dtype=torch.float64)

    def __call__(self, xt, t):
        a = self.abar[t].view(-1, 1)
        x = xt.to(torch.float64).flatten(1)
        d2 = ((x[:, None, :] - a.sqrt()[:, :, None] * self.points[None]) ** 2).sum(-1)
        weights = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        eps = (x - a.sqrt() * (weights @ self.points)) / (1 - a).sqrt()
        return eps.view_as(xt).to(xt.dtype)


class GaussianEps:
    """The optimal eps for data N(mu, s^2) in every dimension:
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""

    def __init__(self, mu, s, abar):
        self.mu, self.s = mu, s
        self.abar = torch.as_tensor(abar, dtype=torch.float64)

    def __call__(self, xt, t):
        a = self.abar[t].view(-1, *([1] * (xt.dim() - 1)))
        eps = (1 - a).sqrt() * (xt.to(torch.float64) - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        return eps.to(xt.dtype)


# Three 1x2x2 "images" with values in [-0.9, 0.9], at different distances from the origin and from
# each other, so a sampler that mis-weights the noise would favour some of them.
MIXTURE_POINTS = torch.tensor([[0.8, 0.8, 0.8, 0.8],
                               [-0.8, 0.8, -0.8, 0.8],
                               [0.0, -0.6, 0.1, -0.5]], dtype=torch.float64).view(3, 1, 2, 2)


def mixture_samples(n, seed, **sample_kwargs):
    diffusion = linear_diffusion()
    model = MixtureEps(MIXTURE_POINTS, np.cumprod(1 - paper_linear_betas()))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 1, 2, 2), generator=g, dtype=torch.float64)
    x = diffusion.sample(model, (n, 1, 2, 2), td.SamplingSpec(**sample_kwargs), generator=g, noise=noise)
    assert x.shape == (n, 1, 2, 2)
    return x


def assert_samples_are_the_points_in_equal_shares(x, points, tol=1e-4):
    n, k = len(x), len(points)
    dist = (x.flatten(1)[:, None, :].double() - points.flatten(1)[None]).norm(dim=-1)  # (n, K)
    nearest_dist, nearest = dist.min(dim=1)
    assert nearest_dist.max().item() < tol, f"a sample is {nearest_dist.max().item():.3g} from every data point"
    shares = torch.bincount(nearest, minlength=k).double() / n
    stderr = math.sqrt((1 / k) * (1 - 1 / k) / n)
    assert torch.all((shares - 1 / k).abs() < SIGMAS * stderr), f"shares {shares.tolist()} vs 1/{k} +- {stderr:.3g}"


@pytest.mark.parametrize("sample_kwargs", [
    dict(sampler="ddpm"),                                       # all T = 1000 steps, Algorithm 2
    dict(sampler="ddpm", steps=100),                            # respaced chain, fixedlarge
    dict(sampler="ddpm", steps=100, var_type="fixedsmall"),     # respaced chain, posterior variance
    dict(sampler="ddim", steps=50, eta=0.0),                    # deterministic DDIM
    dict(sampler="ddim", steps=100, eta=1.0),                   # stochastic DDIM
], ids=["ddpm_1000", "ddpm_100_fixedlarge", "ddpm_100_fixedsmall", "ddim_50_eta0", "ddim_100_eta1"])
def test_sampling_with_the_exact_predictor_of_a_three_point_dataset_lands_on_the_points_in_equal_shares(sample_kwargs):
    x = mixture_samples(4000, seed=1, **sample_kwargs)
    assert_samples_are_the_points_in_equal_shares(x, MIXTURE_POINTS)


def test_sampling_a_three_channel_point_dataset_reaches_every_point_in_equal_shares():
    points = torch.tensor(np.random.default_rng(3).uniform(-0.9, 0.9, (3, 3, 2, 2)))
    diffusion = linear_diffusion()
    model = MixtureEps(points, np.cumprod(1 - paper_linear_betas()))
    x = diffusion.sample(model, (3000, 3, 2, 2), td.SamplingSpec("ddpm", 200),
                         noise=torch.randn(3000, 3, 2, 2, dtype=torch.float64),
                         generator=torch.Generator().manual_seed(5))
    assert_samples_are_the_points_in_equal_shares(x, points)


def test_ddpm_sampling_works_in_float32_from_internal_noise():
    diffusion = linear_diffusion()
    model = MixtureEps(MIXTURE_POINTS, np.cumprod(1 - paper_linear_betas()))
    x = diffusion.sample(model, (2000, 1, 2, 2), td.SamplingSpec("ddpm", 100), generator=torch.Generator().manual_seed(2))
    assert x.dtype == torch.float32
    assert_samples_are_the_points_in_equal_shares(x, MIXTURE_POINTS, tol=1e-3)


GAUSS_MU, GAUSS_S = 0.3, 0.5


def gaussian_samples(n, seed, **sample_kwargs):
    diffusion = linear_diffusion()
    model = GaussianEps(GAUSS_MU, GAUSS_S, np.cumprod(1 - paper_linear_betas()))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 3, 2, 2), generator=g, dtype=torch.float64)
    return diffusion.sample(model, (n, 3, 2, 2), td.SamplingSpec(clip_x0="none", **sample_kwargs), generator=g,
                            noise=noise).flatten()


@pytest.mark.parametrize("sample_kwargs", [
    dict(sampler="ddpm", var_type="fixedlarge"),
    dict(sampler="ddpm", var_type="fixedsmall"),
    dict(sampler="ddim", eta=0.0),
    dict(sampler="ddim", eta=1.0),
], ids=["ddpm_fixedlarge", "ddpm_fixedsmall", "ddim_eta0", "ddim_eta1"])
def test_sampling_all_steps_with_the_exact_predictor_of_gaussian_data_reproduces_its_mean_and_std(sample_kwargs):
    # All T steps. Neither sigma^2 = beta_t nor beta-tilde_t is the exact reverse variance for
    # Gaussian data (Ho et al. sec. 3.2), so even with T steps the std is off by a little: the exact
    # recursion below gives 0.5008 (fixedlarge), 0.4961 (fixedsmall, DDIM eta=1), 0.4985 (DDIM eta=0).
    # The tolerance is the sampling error plus a discretisation budget of 1% of s.
    x = gaussian_samples(2000, seed=4, **sample_kwargs)
    n = x.numel()  # independent: the predictor acts on each dimension separately
    assert x.mean().item() == pytest.approx(GAUSS_MU, abs=SIGMAS * GAUSS_S / math.sqrt(n))
    assert x.std().item() == pytest.approx(GAUSS_S, abs=SIGMAS * GAUSS_S / math.sqrt(2 * n) + 0.01 * GAUSS_S)


def exact_gaussian_sampler_output(num_steps, sampler, var_type="fixedlarge", eta=0.0, mu=GAUSS_MU, s=GAUSS_S):
    """Mean and std of what a sampler produces for data N(mu, s^2) with the exact predictor, by
    propagating N(0, 1) through the linear-Gaussian reverse steps written from the papers:
    the respaced chain of strided alpha_bars (Nichol & Dhariwal sec. 4), Ho et al. eqs. 6-7 with
    sigma^2 = beta or beta-tilde, and DDIM eq. 12 with sigma from eq. 16."""
    abar_all = np.cumprod(1 - paper_linear_betas())
    ts = np.round(np.linspace(0, T - 1, num_steps)).astype(int)
    abar = abar_all[ts]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / abar_prev
    mean, var = 0.0, 1.0
    for i in reversed(range(num_steps)):
        a, ap = abar[i], abar_prev[i]
        gain = s ** 2 * math.sqrt(a) / (a * s ** 2 + 1 - a)      # E[x0 | x_t] = mu + gain (x_t - sqrt(a) mu)
        offset = mu - gain * math.sqrt(a) * mu
        if sampler == "ddpm":
            c1 = beta[i] * math.sqrt(ap) / (1 - a)
            c2 = (1 - ap) * math.sqrt(1 - beta[i]) / (1 - a)
            A, B = c1 * gain + c2, c1 * offset
            noise_var = (beta[i] if var_type == "fixedlarge" else beta[i] * (1 - ap) / (1 - a)) if i > 0 else 0.0
        else:
            sigma2 = eta ** 2 * (1 - ap) / (1 - a) * (1 - a / ap)
            ce = math.sqrt(max(1 - ap - sigma2, 0.0))
            # x' = sqrt(ap) x0hat + ce (x - sqrt(a) x0hat) / sqrt(1 - a)
            A = math.sqrt(ap) * gain + ce * (1 - math.sqrt(a) * gain) / math.sqrt(1 - a)
            B = math.sqrt(ap) * offset - ce * math.sqrt(a) * offset / math.sqrt(1 - a)
            noise_var = sigma2
        mean, var = A * mean + B, A * A * var + noise_var
    return mean, math.sqrt(var)


@pytest.mark.parametrize("num_steps,sampler,var_type,eta", [
    (50, "ddpm", "fixedlarge", 0.0),
    (50, "ddpm", "fixedsmall", 0.0),
    (20, "ddim", None, 0.0),
    (50, "ddim", None, 1.0),
])
def test_strided_sampling_of_gaussian_data_matches_the_exact_linear_gaussian_recursion(num_steps, sampler, var_type, eta):
    # With few steps neither sigma^2 = beta (too wide) nor beta-tilde (too narrow) is exact, and
    # deterministic DDIM shrinks the variance; the recursion predicts exactly by how much.
    expected_mean, expected_std = exact_gaussian_sampler_output(num_steps, sampler, var_type or "fixedlarge", eta)
    kwargs = dict(sampler=sampler, steps=num_steps)
    kwargs.update(dict(var_type=var_type) if sampler == "ddpm" else dict(eta=eta))
    x = gaussian_samples(8000, seed=6, **kwargs)
    n = x.numel()
    assert x.mean().item() == pytest.approx(expected_mean, abs=SIGMAS * expected_std / math.sqrt(n))
    assert x.std().item() == pytest.approx(expected_std, abs=SIGMAS * expected_std / math.sqrt(2 * n))


def test_fixedlarge_and_fixedsmall_bracket_the_data_std_when_sampling_with_few_steps():
    # Ho et al. sec. 3.2: beta_t is optimal for x_0 ~ N(0, I) and beta-tilde_t for a point mass, so
    # for data between the two they err in opposite directions.
    large = gaussian_samples(8000, seed=7, sampler="ddpm", steps=50, var_type="fixedlarge").std().item()
    small = gaussian_samples(8000, seed=7, sampler="ddpm", steps=50, var_type="fixedsmall").std().item()
    assert small < GAUSS_S < large


def test_ddim_with_eta_one_is_ddpm_with_the_posterior_variance_on_the_same_steps():
    # Song et al. 2021 sec. 4.1: eta = 1 gives sigma_t^2 = beta-tilde_t of the (respaced) DDPM chain.
    diffusion = linear_diffusion()
    model = MixtureEps(MIXTURE_POINTS, np.cumprod(1 - paper_linear_betas()))
    noise = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    ddim = diffusion.sample(model, noise.shape, td.SamplingSpec("ddim", 40, eta=1.0, clip_x0="none"), noise=noise,
                            generator=torch.Generator().manual_seed(9))
    ddpm = diffusion.sample(model, noise.shape, td.SamplingSpec("ddpm", 40, var_type="fixedsmall", clip_x0="none"),
                            noise=noise, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-6, atol=1e-6)


def test_ddim_step_from_a_clipped_clean_image_uses_the_noise_that_points_back_to_x_t():
    # Song et al. eq. 12, x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar') eps, with x0 clipped to [-1, 1]
    # and eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) re-derived from the clipped x0 (improved-diffusion).
    # Two steps, t = 999 then t = 0: at t = 999 the model implies x0 = 3 (clipped to 1); at t = 0 it
    # predicts zero noise, so the output is x_0 / sqrt(abar_0) of the state after the first step.
    diffusion = linear_diffusion()
    abar = np.cumprod(1 - paper_linear_betas())

    def model(x, t):
        if int(t[0]) == T - 1:
            return (x - math.sqrt(abar[-1]) * 3.0) / math.sqrt(1 - abar[-1])
        return torch.zeros_like(x)

    x_T = torch.tensor([-0.5, -2.0, -0.1], dtype=torch.float64).view(3, 1, 1, 1)
    out = diffusion.sample(model, x_T.shape, td.SamplingSpec("ddim", 2, eta=0.0, clip_x0="static"), noise=x_T)
    eps = (x_T - math.sqrt(abar[-1]) * 1.0) / math.sqrt(1 - abar[-1])
    x_0 = math.sqrt(abar[0]) * 1.0 + math.sqrt(1 - abar[0]) * eps
    expected = (x_0 / math.sqrt(abar[0])).clamp(-1, 1)
    assert torch.all(expected < 1)  # the second step's clip does not hide the first step's result
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# --- 5. Determinism and strided timesteps ------------------------------------------------------------

def test_ddim_with_eta_zero_is_deterministic_given_the_noise_whatever_the_generator():
    diffusion = linear_diffusion()
    model = GaussianEps(GAUSS_MU, GAUSS_S, diffusion.alphas_cumprod)
    noise = torch.randn(32, 3, 2, 2, dtype=torch.float64)
    spec = td.SamplingSpec("ddim", 25, eta=0.0)
    a = diffusion.sample(model, noise.shape, spec, noise=noise, generator=torch.Generator().manual_seed(1))
    b = diffusion.sample(model, noise.shape, spec, noise=noise.clone(), generator=torch.Generator().manual_seed(12345))
    c = td.ddim_sample(model, diffusion, noise.clone(), spec.timesteps(diffusion), spec)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_ddpm_with_the_same_generator_seed_repeats_and_with_another_seed_differs():
    diffusion = linear_diffusion()
    model = GaussianEps(GAUSS_MU, GAUSS_S, diffusion.alphas_cumprod)
    noise = torch.randn(16, 1, 2, 2, dtype=torch.float64)
    spec = td.SamplingSpec("ddpm", 30, clip_x0="none")
    runs = [td.ddpm_sample(model, diffusion, noise, spec.timesteps(diffusion), spec,
                           generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("num_timesteps", [2, 7, 50, 1000])
def test_strided_timesteps_are_k_unique_increasing_ints_from_zero_to_t_minus_one(num_timesteps):
    ks = range(2, num_timesteps + 1) if num_timesteps <= 50 else [2, 3, 10, 50, 100, 250, 333, 500, 999, 1000]
    for k in ks:
        ts = td.strided_timesteps(num_timesteps, k)
        assert ts.dtype == torch.int64
        values = ts.tolist()
        assert len(values) == k
        assert all(b > a for a, b in zip(values, values[1:])), f"K={k}: {values}"
        assert values[0] == 0 and values[-1] == num_timesteps - 1
        # evenly spread: each is the integer nearest to its point of the even grid over [0, T - 1]
        grid = np.linspace(0, num_timesteps - 1, k)
        assert np.all(np.abs(np.array(values) - grid) <= 0.5 + 1e-9), f"K={k}: {values}"
    assert td.strided_timesteps(num_timesteps, num_timesteps).tolist() == list(range(num_timesteps))


def test_one_strided_timestep_is_the_last():
    assert td.strided_timesteps(1000, 1).tolist() == [999]


@pytest.mark.parametrize("k", [0, -1, 1001])
def test_strided_timesteps_outside_one_to_t_raise_value_error(k):
    with pytest.raises(ValueError):
        td.strided_timesteps(1000, k)


def test_unknown_sampler_raises_value_error():
    diffusion = linear_diffusion(10)
    with pytest.raises(ValueError):
        diffusion.sample(lambda x, t: x, (1, 1, 2, 2), td.SamplingSpec(sampler="euler"))


# --- 6. UNet and timestep embedding ------------------------------------------------------------------

def tiny_unet(**kw):
    args = dict(image_size=8, in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0, emb_dim=16)
    args.update(kw)
    num_classes, in_channels = args.pop("num_classes", 0), args.pop("in_channels", 3)
    return td.UNet(td.Config(**args), num_classes, in_channels)


def test_unet_output_has_the_shape_of_its_input():
    model = tiny_unet()
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([0, 999])).shape == x.shape
    model = tiny_unet(in_channels=1, channel_mults=(1, 2, 2), use_attention=False)
    x = torch.randn(3, 1, 8, 8)
    assert model(x, torch.tensor([1, 2, 3])).shape == x.shape


def test_paper_unet_has_the_35_746_307_parameters_of_ho_et_al_cifar10_model():
    assert td.count_parameters(td.UNet()) == 35_746_307


def test_the_unets_normalisation_and_downsampling_are_the_papers_tensorflow_choices():
    model = td.UNet()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(n.eps == 1e-6 and n.num_groups == 32 for n in norms)
    # TensorFlow 'SAME' with stride 2 on an even size pads one row and column at the bottom and right
    # only, so output (i, j) starts at input (2i, 2j); padding every side starts it at (2i - 1, 2j - 1).
    x = torch.arange(1.0, 65.0).reshape(1, 1, 8, 8)
    for padding, first_row in (("same", [1.0, 3.0, 5.0, 7.0]), ("symmetric", [0.0, 0.0, 0.0, 0.0])):
        down = td.Downsample(1, padding)
        with torch.no_grad():
            down.conv.weight.zero_()
            down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each window
            down.conv.bias.zero_()
            out = down(x, None)
        assert out.shape == (1, 1, 4, 4)
        assert out[0, 0, 0].tolist() == first_row, padding
        if padding == "same":
            assert torch.equal(out[0, 0], x[0, 0, ::2, ::2])
        else:
            assert torch.equal(out[0, 0, 1:, 1:], x[0, 0, 1:-1:2, 1:-1:2])


def group_counts(model):
    return {(m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}


def test_narrow_levels_get_fewer_groups_so_every_block_still_sees_the_timestep():
    # One channel per group subtracts the per-channel constant the timestep embedding adds, exactly:
    # a UNet whose every norm is like that predicts the same noise at t = 10 and t = 900.
    def difference_between_t(**norm):
        torch.manual_seed(0)
        model = td.UNet(td.Config(base_channels=32, channel_mults=(1, 1), num_res_blocks=1, emb_dim=64, dropout=0.0,
                                  **norm)).eval()
        for module in model.modules():  # wake the zero-initialised layers so the output is not 0
            if getattr(module, "zero_init", False):
                torch.nn.init.normal_(module.weight, std=0.05)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            early, late = model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900]))
        assert early.abs().mean() > 0.05
        return (early - late).abs().max().item(), group_counts(model)

    blind, groups = difference_between_t(norm_groups=32, norm_min_channels=1)
    assert blind < 1e-4 and {g for _, g in groups} == {32}
    sees, groups = difference_between_t(norm_groups=32)  # the default: at least 4 channels per group
    assert sees > 0.05 and groups == {(32, 8), (64, 16)}
    # the rule: the largest divisor of gcd(groups, width) leaving min_channels per group
    assert [td.Norm(32, min_channels=4).group_count(c) for c in (8, 16, 32, 48, 64, 96, 128, 256, 6)] == \
           [2, 4, 8, 8, 16, 16, 32, 32, 1]
    assert td.Norm(32, min_channels=1).group_count(32) == 32 and td.Norm(8, min_channels=4).group_count(64) == 8
    # the paper's model and the presets built on its width keep 32 groups everywhere
    assert {g for _, g in group_counts(td.UNet())} == {32}


def test_a_checkpoint_config_without_the_new_architecture_fields_keeps_the_values_it_was_trained_with():
    saved = td.asdict(td.preset_config("quick_test", {}))
    del saved["norm_eps"], saved["downsample_padding"], saved["norm_min_channels"]
    saved["norm_groups"] = 32  # quick_test's count then
    old = td.config_from_dict(saved)
    assert (old.norm_eps, old.downsample_padding, old.norm_min_channels) == (1e-5, "symmetric", 1)
    model = td.build_model(old)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert (32, 32) in group_counts(model)  # trained with one channel per group at the 32-wide level
    assert all(m.conv.padding == (1, 1) for m in model.modules() if isinstance(m, td.Downsample))
    new = td.config_from_dict(td.asdict(td.preset_config("quick_test", {})))
    assert (new.norm_eps, new.downsample_padding, new.norm_min_channels) == (1e-6, "same", 4)


def test_untrained_unet_predicts_exactly_zero_noise():
    model = tiny_unet().eval()
    out = model(torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]))
    assert torch.all(out == 0)


def test_loss_of_the_untrained_unet_is_the_mean_square_of_the_noise_about_one():
    model = tiny_unet()
    diffusion = linear_diffusion()
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    loss = diffusion.loss(model, x0, noise=noise)
    assert loss.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-6)
    n = noise.numel()
    assert loss.item() == pytest.approx(1.0, abs=SIGMAS * math.sqrt(2 / n))


def test_timestep_embedding_has_shape_batch_by_dim_and_is_sin_then_cos_of_geometric_frequencies():
    dim = 16
    t = torch.tensor([0, 1, 7, 999])
    emb = td.timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    half = dim // 2
    # Ho et al. / Vaswani et al.: frequency i is 10000^(-i / (half - 1)), sin block then cos block.
    freqs = 10000.0 ** (-np.arange(half) / (half - 1))
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=1e-4)
    assert torch.all(emb[0, :half] == 0) and torch.all(emb[0, half:] == 1)  # t = 0: sin = 0, cos = 1


def test_timestep_embedding_of_odd_dim_is_zero_padded():
    emb = td.timestep_embedding(torch.tensor([3, 4]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)


# --- 7. EMA ------------------------------------------------------------------------------------------

def test_ema_decay_warms_up_as_one_plus_step_over_ten_plus_step_then_caps_at_decay():
    ema = td.EMA(torch.nn.Linear(2, 2), 0.999)
    for step in (0, 1, 5, 100, 1000, 8990, 9000, 10 ** 6):
        assert ema.decay_at(step) == pytest.approx(min(0.999, (1 + step) / (10 + step)), rel=1e-15)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10 ** 6) == 0.999


@pytest.mark.parametrize("step", [0, 3, 10 ** 5])
def test_ema_update_is_decay_times_old_plus_one_minus_decay_times_new(step):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    ema = td.EMA(model, 0.99)
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step)
    d = min(0.99, (1 + step) / (10 + step))
    for p_ema, p_old, p_new in zip(ema.model.parameters(), old, model.parameters()):
        torch.testing.assert_close(p_ema, d * p_old + (1 - d) * p_new.detach(), rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in ema.model.parameters())


# --- 8. Learning-rate schedule -----------------------------------------------------------------------

def make_schedule(steps_per_epoch=5, **overrides):
    cfg = dataclasses.replace(td.Config(), learning_rate=1e-3, min_lr=1e-5, warmup_steps=10,
                              restart_period=2, restart_mult=1, scheduler="cosine_restarts")
    cfg = dataclasses.replace(cfg, **overrides)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    return td.LRSchedule(optimizer, cfg, steps_per_epoch), cfg, optimizer


def cosine_lr(cfg, e_in_period, period):
    return cfg.min_lr + (cfg.learning_rate - cfg.min_lr) * (1 + math.cos(math.pi * e_in_period / period)) / 2


def test_lr_warms_up_linearly_to_the_base_lr():
    schedule, cfg, optimizer = make_schedule()
    for step in range(cfg.warmup_steps):
        lr = schedule.set_step(step)
        assert lr == pytest.approx(cfg.learning_rate * (step + 1) / cfg.warmup_steps, rel=1e-12)
        assert optimizer.param_groups[0]["lr"] == lr


def test_lr_after_warmup_follows_the_cosine_and_restarts_every_restart_period_epochs():
    spe = 5
    schedule, cfg, _ = make_schedule(steps_per_epoch=spe)
    period_steps = cfg.restart_period * spe
    for step in range(cfg.warmup_steps, cfg.warmup_steps + 3 * period_steps + 3):
        e = (step - cfg.warmup_steps) / spe
        expected = cosine_lr(cfg, e % cfg.restart_period, cfg.restart_period)
        assert schedule.set_step(step) == pytest.approx(expected, rel=1e-9), f"step {step}"
    for k in (1, 2, 3):
        assert schedule.set_step(cfg.warmup_steps + k * period_steps) == pytest.approx(cfg.learning_rate, rel=1e-12)
        assert schedule.set_step(cfg.warmup_steps + k * period_steps - 1) < 0.1 * cfg.learning_rate


def test_lr_restart_periods_grow_by_restart_mult():
    spe = 5
    schedule, cfg, _ = make_schedule(steps_per_epoch=spe, restart_mult=2)
    # periods of 2, 4, 8 epochs: restarts at 2 and 6 epochs after warmup
    boundaries = [0, 2, 6, 14]
    for step in range(cfg.warmup_steps, cfg.warmup_steps + 14 * spe):
        e = (step - cfg.warmup_steps) / spe
        k = max(i for i in range(3) if boundaries[i] <= e)
        expected = cosine_lr(cfg, e - boundaries[k], boundaries[k + 1] - boundaries[k])
        assert schedule.set_step(step) == pytest.approx(expected, rel=1e-9), f"step {step}, epoch {e}"
    for e in (2, 6):
        assert schedule.set_step(cfg.warmup_steps + e * spe) == pytest.approx(cfg.learning_rate, rel=1e-12)
    # mid-way through the second period (4 epochs long) the LR is at the cosine's midpoint
    mid = (cfg.learning_rate + cfg.min_lr) / 2
    assert schedule.set_step(cfg.warmup_steps + 4 * spe) == pytest.approx(mid, rel=1e-9)


def test_cosine_scheduler_falls_once_from_the_peak_to_min_lr_at_the_runs_last_planned_step():
    spe = 5
    for limits, total in (dict(epochs=7, max_steps=0), 35), (dict(epochs=100, max_steps=23), 23):
        schedule, cfg, _ = make_schedule(steps_per_epoch=spe, scheduler="cosine", **limits)
        assert schedule.set_step(cfg.warmup_steps - 1) == pytest.approx(cfg.learning_rate, rel=1e-12)
        for step in range(cfg.warmup_steps, total + 5):
            progress = min(1, (step - cfg.warmup_steps) / (total - cfg.warmup_steps))
            assert schedule.set_step(step) == pytest.approx(cosine_lr(cfg, progress, 1), rel=1e-9), f"step {step}"
        assert schedule.set_step(total) == pytest.approx(cfg.min_lr, rel=1e-12)  # and it stays there
        assert schedule.set_step(total + 100) == pytest.approx(cfg.min_lr, rel=1e-12)


def test_constant_scheduler_keeps_the_base_lr_after_warmup():
    schedule, cfg, _ = make_schedule(scheduler="constant", warmup_steps=4)
    assert [schedule.set_step(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    for step in (4, 5, 50, 10_000):
        assert schedule.set_step(step) == cfg.learning_rate


def test_zero_warmup_starts_at_the_base_lr():
    schedule, cfg, _ = make_schedule(warmup_steps=0)
    assert schedule.set_step(0) == pytest.approx(cfg.learning_rate, rel=1e-12)


# --- 9. Presets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(td.PRESETS))
def test_every_preset_builds_a_valid_config(name):
    cfg = td.preset_config(name, {})
    assert cfg.preset == name
    td.validate_config(cfg)
    for key, value in td.PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_ddpm_paper_runs_the_papers_800k_steps_on_cifar10():
    cfg = td.preset_config("ddpm_paper", {})
    steps_per_epoch = td.steps_per_epoch(50_000, cfg.batch_size)  # whole batches of CIFAR-10's training set
    assert td.planned_steps(cfg, steps_per_epoch) == 800_000
    assert cfg.epochs * steps_per_epoch >= 800_000 > (cfg.epochs - 1) * steps_per_epoch  # no idle epochs either


@pytest.mark.parametrize("name", list(td.PRESETS))
def test_the_menu_line_of_a_preset_states_its_real_size_and_recipe(name):
    cfg = td.preset_config(name, {})
    line = td.preset_summary(name)
    assert f"{td.count_parameters(td.build_model(cfg)) / 1e6:.2f}M parameters" in line
    assert f"T={cfg.timesteps} {cfg.schedule_type}" in line and f"batch {cfg.batch_size}" in line
    if name == "best_quality":
        assert "34.24M" in line  # its time embedding is 256 wide, not the paper's 512


@pytest.mark.parametrize("name", list(td.PRESETS))
def test_every_preset_ends_its_forward_chain_in_nearly_pure_noise(name):
    # Sampling starts from N(0, I), so sqrt(abar_T) must be small (Ho et al. sec. 4: "x_T ~ N(0, I)").
    cfg = td.preset_config(name, {})
    if cfg.schedule_type == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps)
    else:
        f = nichol_f(cfg.timesteps, cfg.cosine_s)
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    assert math.sqrt(np.prod(1 - betas)) < 0.02
