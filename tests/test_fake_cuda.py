"""CUDA device placement without a GPU: PyTorch's FakeTensorMode makes tensors on a fake `cuda`
device and raises FakeTensorDeviceMismatchError wherever a CPU tensor meets a CUDA one, so the
code paths that run on a GPU can be checked for CPU/CUDA mixing on any machine."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import train_ddpm as td


@pytest.fixture
def fake_cuda():
    with FakeTensorMode():
        yield torch.device("cuda")


def test_the_fake_device_catches_a_cpu_tensor_meeting_a_cuda_one(fake_cuda):
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
    with pytest.raises(FakeTensorDeviceMismatchError):
        torch.cat([torch.ones(1), torch.ones(3, device=fake_cuda)])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_schedule_built_on_cuda_and_its_respaced_chain_stay_on_cuda(kind):
    # the host tables, made on the CPU (real tensors must not enter the fake mode)
    betas = td.make_beta_schedule(kind, 100, 1e-3, 0.2).numpy()
    timesteps = td.strided_timesteps(100, 10).tolist()
    on_cpu = td.GaussianDiffusion(betas)
    with FakeTensorMode(allow_non_fake_inputs=True):  # real CPU buffers become fake CPU tensors in .to()
        for diffusion in (td.GaussianDiffusion(betas, device="cuda"), on_cpu.to("cuda")):
            # --sampler ddpm --sampling_steps 10 builds this chain from the CUDA schedule
            chain = diffusion.respace(timesteps)
            assert chain.num_timesteps == 10
            for name, buffer in chain.named_buffers():
                assert buffer.device.type == "cuda", name
            x = torch.randn(4, 3, 8, 8, device="cuda")
            t = torch.full((4,), 9, device="cuda", dtype=torch.long)
            mean, log_variance, _ = chain.p_mean_variance(torch.randn_like(x), x, t, "static", "fixedsmall")
            assert mean.device.type == "cuda" and log_variance.device.type == "cuda"
            loss = diffusion.training_losses(lambda x_t, t: torch.zeros_like(x_t), x, t)
            assert loss.device.type == "cuda"


def test_the_respaced_chain_keeps_the_strided_alpha_bars_exactly():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    timesteps = td.strided_timesteps(100, 10)
    chain = diffusion.respace(timesteps)
    np.testing.assert_allclose(chain.alphas_cumprod.numpy(), diffusion.alphas_cumprod[timesteps].numpy(),
                               rtol=1e-12)


def tiny_unet(num_classes=0):
    return td.UNet(td.Config(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                             dropout=0.0, emb_dim=16, norm_groups=2), num_classes)


@pytest.mark.parametrize("sampler", sorted(td.SAMPLERS))
@pytest.mark.parametrize("clip", ["static", "dynamic", "none"])
def test_every_sampler_runs_on_cuda_without_touching_the_cpu(sampler, clip):
    betas = td.make_beta_schedule("linear", 100, 1e-3, 0.2).numpy()
    with FakeTensorMode(), torch.device("cuda"):
        diffusion = td.GaussianDiffusion(betas, device="cuda")
        model = tiny_unet(num_classes=3)
        classes = torch.tensor([0, -1])
        # fewer steps than T (the respaced chain for ddpm), given noise or drawn, unguided or guided
        for noise, guidance in ((None, 1.0), (torch.randn(2, 3, 8, 8), 2.0)):
            spec = td.SamplingSpec(sampler, 5, var_type="fixedsmall", clip_x0=clip, guidance_scale=guidance)
            x = diffusion.sample(model, (2, 3, 8, 8), spec, noise=noise, classes=classes)
            assert x.shape == (2, 3, 8, 8) and x.device.type == "cuda"


def test_the_training_loss_of_a_class_conditional_unet_stays_on_cuda():
    betas = td.make_beta_schedule("linear", 100, 1e-3, 0.2).numpy()
    with FakeTensorMode(), torch.device("cuda"):
        diffusion = td.GaussianDiffusion(betas, device="cuda")
        model = tiny_unet(num_classes=3)
        forward = td.Precision(model, torch.device("cuda"), None, channels_last=True)
        x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 100, (4,)), torch.tensor([0, 1, 2, -1])
        losses = diffusion.training_losses(forward, x, t, torch.randn_like(x), y)
        assert losses.shape == (4,) and losses.device.type == "cuda"


def test_the_timestep_table_and_its_draws_stay_on_cuda():
    betas = td.make_beta_schedule("linear", 100, 1e-3, 0.2).numpy()
    with FakeTensorMode(allow_non_fake_inputs=True):  # the host table becomes a fake tensor in .to()
        diffusion = td.GaussianDiffusion(betas, device="cuda")
        training_noise = td.TrainingNoise(diffusion, "lognormal")
        assert training_noise.cdf.device.type == "cuda" and training_noise.cdf.dtype == torch.float64
        t = training_noise.timesteps(torch.rand(4, device="cuda", dtype=torch.float64))  # draw()'s uniforms
        assert t.device.type == "cuda" and t.dtype == torch.int64
        x = torch.randn(4, 3, 8, 8, device="cuda")
        losses = diffusion.training_losses(lambda x_t, t: torch.zeros_like(x_t), x, t, torch.randn_like(x))
        assert losses.device.type == "cuda"
