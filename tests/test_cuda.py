"""Every CUDA branch, briefly, on the first GPU there is: skipped where CUDA is absent.

Each test compares the GPU path with a reference it must equal to tolerance (fp32 on the GPU, or
the same computation on the CPU), on tiny models, in seconds. bench/gpu_check.sh runs this file
first on a fresh GPU machine.
"""

import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import OFFLINE, SCRIPT, TINY, assert_ok, load_ckpt, run_cli
import test_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

cifar_dir = test_cli.cifar_dir  # fixture shared with test_cli
CUDA = torch.device("cuda")
GPU_FLAGS = [*TINY, "--device", "cuda", "--val_size", "0", "--sample_every", "0"]


def tiny_unet(dropout=0.0):
    torch.manual_seed(0)
    return td.UNet(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=dropout, emb_dim=32)


def diffusion():
    return td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))


def batch(n=16, seed=1, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 100, (n,), generator=g)
    return x.to(device), t.to(device), torch.randn(x.shape, generator=g).to(device)


@pytest.fixture(autouse=True, scope="module")
def exact_fp32():
    """TF32 off (cuDNN turns it on by default), so fp32 on the GPU can be held to CPU tolerances;
    module-scoped, so it is off before the module-scoped fp32 reference is computed too."""
    td.set_tf32(False)
    yield
    td.set_tf32(True)


def train_steps(amp_dtype=None, fused=True, channels_last=False, compile=False, micro_batches=1,
                checkpointing=False, ddp=False, steps=3):
    """A few train_step calls of the tiny UNet on the GPU; returns (weights, last losses)."""
    model = td.place_model(tiny_unet(), CUDA, channels_last)
    model.grad_checkpointing = checkpointing
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[CUDA.index or 0]) if ddp else model
    forward = td.Precision(torch.compile(net) if compile else net, CUDA, amp_dtype, channels_last)
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3, fused_adamw=fused))
    if fused:
        assert optimizer.defaults.get("fused"), "CUDA has the fused AdamW kernel"
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    gd = diffusion().to(CUDA)
    for step in range(steps):
        x, t, noise = batch(seed=step)
        grad_norm, losses, bad = td.train_step(forward, model, gd, x, t, noise, optimizer, scaler, 1.0,
                                               micro_batches=micro_batches)
        assert not bad.item()
    return Steps(torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu(), losses.cpu(),
                 grad_norm.cpu())


class Steps(NamedTuple):
    weights: torch.Tensor  # all parameters after the steps, flat
    losses: torch.Tensor   # per image, of the last step
    grad_norm: torch.Tensor  # of the last step, before clipping


def assert_same_steps(steps, reference, loss_tol=1e-5, min_cosine=0.999):
    """Same losses and gradient norm (a wrongly scaled gradient shows here: AdamW's update would hide
    it), and updates pointing the same way. The weights are not compared one by one: AdamW's
    normalised step turns rounding in a near-zero gradient into a step of +-lr."""
    torch.testing.assert_close(steps.losses, reference.losses, atol=loss_tol, rtol=loss_tol)
    torch.testing.assert_close(steps.grad_norm, reference.grad_norm, atol=0, rtol=max(loss_tol, 1e-4))
    start = torch.cat([p.detach().flatten() for p in tiny_unet().parameters()])
    cosine = torch.nn.functional.cosine_similarity(steps.weights - start, reference.weights - start, dim=0)
    assert cosine > min_cosine, cosine


@pytest.fixture(scope="module")
def fp32():
    return train_steps(fused=False)


def test_fp32_training_on_the_gpu_equals_the_cpu(fp32):
    model, gd = tiny_unet(), diffusion()
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3, fused_adamw=False))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        x, t, noise = batch(seed=step, device="cpu")
        grad_norm, losses, _ = td.train_step(model, model, gd, x, t, noise, optimizer, scaler, 1.0)
    cpu = Steps(torch.cat([p.detach().flatten() for p in model.parameters()]), losses, grad_norm)
    assert_same_steps(fp32, cpu, loss_tol=1e-4)


@pytest.mark.parametrize("options", [dict(fused=True), dict(channels_last=True), dict(micro_batches=4),
                                     dict(checkpointing=True), dict(fused=False, compile=True)],
                         ids=["fused-adamw", "channels-last", "grad-accum", "grad-checkpointing", "compile"])
def test_each_fp32_switch_takes_the_plain_steps(fp32, options):
    assert_same_steps(train_steps(**options), fp32, loss_tol=1e-4)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-grad-scaler"])
def test_mixed_precision_trains_as_fp32_does(fp32, amp_dtype):
    assert_same_steps(train_steps(amp_dtype=amp_dtype), fp32, loss_tol=0.02, min_cosine=0.95)


def test_sampling_on_the_gpu_draws_the_cpu_images_for_a_fixed_x_t():
    model = tiny_unet().eval()
    for p in model.parameters():  # leave the zero init, so the samples depend on the weights
        torch.nn.init.normal_(p, std=0.02) if p.abs().sum() == 0 else None
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for sampler, steps in (("ddim", 20), ("dpmpp2m", 10)):
        with torch.no_grad():
            cpu = diffusion().sample(model, x_T.shape, sampler, steps, noise=x_T)
            gpu = diffusion().to(CUDA).sample(model.to(CUDA), x_T.shape, sampler, steps, noise=x_T.to(CUDA))
        model.cpu()
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0, msg=sampler)


def test_fid_features_on_the_gpu_equal_the_cpu_features():
    import torchvision
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    extractor = td.InceptionPool3(net).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cpu = td.compute_activations(images, extractor, batch_size=3, progress=False)
    gpu = td.compute_activations(images, extractor.to(CUDA), batch_size=3, device=CUDA, progress=False)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_ddp_over_nccl_with_gradient_accumulation_trains_as_the_plain_model(fp32, tmp_path):
    # One process: NCCL and DDP's hooks and no_sync run even on a single-GPU machine.
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1,
                                         rank=0)
    try:
        steps = train_steps(fused=False, ddp=True, micro_batches=2)
    finally:
        torch.distributed.destroy_process_group()
    assert_same_steps(steps, fp32, loss_tol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_every_gpu_under_torchrun_trains_as_one_process(cifar_dir, tmp_path):
    gpus = torch.cuda.device_count()
    flags = [*GPU_FLAGS, "--max_steps", "4", "--batch_size", 4 * gpus, "--amp", "off", "--tf32", "false",
             "--data_dir", cifar_dir]  # one global batch, fp32
    assert_ok(run_cli(*flags, "--run_name", "one", cwd=tmp_path))
    assert_ok(run_cli(*flags, "--run_name", "many", "--num_gpus", gpus, "--grad_accum", "2", cwd=tmp_path))
    a, b = (load_ckpt(tmp_path / "checkpoints" / name / "latest.pt") for name in ("one", "many"))
    for key in a["model"]:
        # AdamW can turn rounding in a near-zero gradient into a step of +-lr: allow a few such weights
        diff = (b["model"][key].float() - a["model"][key].float()).abs()
        assert (diff > 1e-4).float().mean() < 1e-3 and diff.max() <= 8 * 1e-3, key


def test_a_gpu_run_stops_on_sigterm_saves_and_resumes(cifar_dir, tmp_path):
    env = {**os.environ, **OFFLINE}
    flags = [*GPU_FLAGS, "--epochs", "400", "--save_every", "1000", "--data_dir", cifar_dir]
    with open(tmp_path / "stderr.txt", "w") as err:
        process = subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        log = tmp_path / "checkpoints" / test_cli.RUN / "loss_log.csv"
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) > 2):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143, (tmp_path / "stderr.txt").read_text()[-2000:]
    step = load_ckpt(tmp_path / "checkpoints" / test_cli.RUN / "latest.pt")["step"]
    assert_ok(run_cli("--run_name", test_cli.RUN, "--resume", "latest", "--max_steps", step + 2, cwd=tmp_path))
    assert load_ckpt(tmp_path / "checkpoints" / test_cli.RUN / "latest.pt")["step"] == step + 2
