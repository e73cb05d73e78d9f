"""Class-conditional sampling with classifier-free guidance, against exact noise predictors.

Data: class c is N(mu_c, s_c^2 I); the unconditional law is their mixture. The exact conditional
noise prediction of a Gaussian, and of the mixture, have closed forms (MixturePredictor), so what
each sampler draws at w = 1 (the class), w = 0 (the mixture) and w > 1 is known without training.
"""

import pytest
import torch

import train_ddpm as td
from test_fast_samplers import MixturePredictor

T = 1000
D = 12  # a 3 x 2 x 2 "image"
MEANS = [0.6, -0.5, 0.0]
STDS = [0.2, 0.3, 0.25]
WEIGHTS = [0.5, 0.3, 0.2]
SAMPLERS = [("ddpm", 1000), ("ddim", 1000), ("dpmpp2m", 25)]  # DDIM: few steps narrow the law


class ConditionalOracle:
    """model(x_t, t, y): the exact noise prediction of class y's Gaussian, or of the whole mixture
    where y = -1 (or of `unconditional` when given). Counts its calls and the rows they held."""

    def __init__(self, diffusion, unconditional=None):
        self.classes = [MixturePredictor(diffusion, [[m] * D], [s], [1.0]) for m, s in zip(MEANS, STDS)]
        self.unconditional = unconditional or MixturePredictor(diffusion, [[m] * D for m in MEANS], STDS, WEIGHTS)
        self.calls, self.rows = 0, 0

    def __call__(self, x, t, y):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        eps = torch.empty_like(x)
        for label, predictor in [(-1, self.unconditional), *enumerate(self.classes)]:
            rows = y == label
            if rows.any():
                eps[rows] = predictor(x[rows], t[rows])
        return eps


def diffusion():
    return td.GaussianDiffusion(td.make_beta_schedule("linear", T))


def draw(model, sampler, steps, labels, scale, seed=0):
    chain = diffusion()
    x_T = torch.randn((len(labels), 3, 2, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return chain.sample(model, x_T.shape, td.SamplingSpec(sampler, steps, clip_x0="none", guidance_scale=scale),
                        noise=x_T, classes=labels)


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_at_scale_one_each_class_is_drawn_from_its_own_gaussian(sampler, steps):
    labels = torch.arange(3).repeat_interleave(1000)
    x = draw(ConditionalOracle(diffusion()), sampler, steps, labels, 1.0).reshape(len(labels), -1)
    for c, (mu, s) in enumerate(zip(MEANS, STDS)):
        mine = x[labels == c]
        assert abs(mine.mean().item() - mu) < 0.01, (c, mine.mean())
        assert abs(mine.std().item() - s) < 0.03 * s + 0.005, (c, mine.std())


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_at_scale_zero_the_label_is_ignored_and_the_mixture_is_drawn(sampler, steps):
    oracle = ConditionalOracle(diffusion())
    labels = torch.zeros(3000, dtype=torch.long)  # all asked for class 0, none gets it
    x = draw(oracle, sampler, steps, labels, 0.0).reshape(len(labels), -1).mean(1)
    nearest = (x[:, None] - torch.tensor(MEANS, dtype=x.dtype)[None]).abs().argmin(1)
    shares = torch.bincount(nearest, minlength=3).double() / len(x)
    assert torch.allclose(shares, torch.tensor(WEIGHTS, dtype=shares.dtype), atol=0.035), shares
    assert oracle.rows == len(labels) * oracle.calls  # w = 0 needs only the unconditional half


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_guidance_between_two_gaussians_of_one_width_extrapolates_their_means(sampler, steps):
    # With an unconditional N(mu_u, s^2) and a class N(mu_c, s^2), eps_u + w (eps_c - eps_u) is
    # exactly the noise prediction of N(mu_u + w (mu_c - mu_u), s^2): guided samples have that
    # mean and the class's width, for every w.
    chain = diffusion()
    mu_u, mu_c, s = 0.1, 0.4, 0.25
    oracle = ConditionalOracle(chain, unconditional=MixturePredictor(chain, [[mu_u] * D], [s], [1.0]))
    oracle.classes = [MixturePredictor(chain, [[mu_c] * D], [s], [1.0])]
    labels = torch.zeros(2000, dtype=torch.long)
    for scale in (0.5, 2.0, 3.0):
        oracle.calls = oracle.rows = 0
        x = draw(oracle, sampler, steps, labels, scale)
        assert abs(x.mean().item() - (mu_u + scale * (mu_c - mu_u))) < 0.01, (scale, x.mean())
        assert abs(x.std().item() - s) < 0.03 * s, (scale, x.std())
        assert oracle.rows == 2 * len(labels) * oracle.calls, "one call on the doubled batch per step"


def test_a_class_conditional_unet_takes_labels_and_minus_one_is_its_no_class_row():
    torch.manual_seed(0)
    model = td.UNet(td.Config(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, emb_dim=32, dropout=0.0),
                    num_classes=3).eval()
    for module in model.modules():  # wake the zero-initialised output layers
        if getattr(module, "zero_init", False):
            torch.nn.init.normal_(module.weight, std=0.05)
    assert model.class_emb.num_embeddings == 4
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([5, 5, 5, 5])
    with torch.no_grad():
        by_label = model(x, t, torch.tensor([0, 1, 2, -1]))
        assert torch.equal(model(x, t), model(x, t, torch.full((4,), -1)))  # no labels = no class
        null = model(x, t, torch.full((4,), -1))
        with torch.no_grad():
            model.class_emb.weight[3] = model.class_emb.weight[1]  # make "no class" class 1's vector
        assert torch.allclose(model(x, t, torch.full((4,), -1))[1], by_label[1])
    assert not torch.allclose(by_label[0], by_label[1]) and torch.allclose(by_label[3], null[3])
    # an unconditional UNet has no embedding and refuses labels, so it cannot be fed them by mistake
    plain = td.UNet(td.Config(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, emb_dim=32))
    assert not any("class_emb" in name for name in plain.state_dict())
    assert td.count_parameters(plain) + 4 * 32 == td.count_parameters(model)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.zeros(4, dtype=torch.long))


def test_a_negative_guidance_scale_is_refused():
    with pytest.raises(ValueError, match="at least 0"):
        draw(ConditionalOracle(diffusion()), "ddim", 10, torch.zeros(2, dtype=torch.long), -0.5)
