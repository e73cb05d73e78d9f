"""Every CUDA branch, briefly, on the first GPU there is: skipped where CUDA is absent.

Each test compares the GPU path with a reference it must equal to tolerance (fp32 on the GPU, or
the same computation on the CPU), on tiny models, in seconds. bench/gpu_check.sh runs this file
first on a fresh GPU machine.
"""

import os
import re
import shutil
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


def tiny_unet(dropout=0.0, num_classes=0):
    torch.manual_seed(0)
    return td.UNet(td.Config(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                             attn_resolutions=(8,), dropout=dropout, emb_dim=32), num_classes)


def flat(parameters):
    return torch.cat([p.detach().float().flatten() for p in parameters]).cpu()


def sampling_unet(num_classes=0):
    """The tiny UNet in eval mode, its zero-initialised layers made random too, so that the samples
    depend on all the weights."""
    model = tiny_unet(num_classes=num_classes).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model


def sample_on_both(model, x_T, classes=None, **options):
    """(GPU, CPU) samples of model from the same x_T, drawn as td.SamplingSpec(**options) says."""
    spec = td.SamplingSpec(**options)
    with torch.no_grad():
        cpu = diffusion().sample(model.cpu(), x_T.shape, spec, noise=x_T, classes=classes)
        gpu = diffusion().to(CUDA).sample(model.to(CUDA), x_T.shape, spec, noise=x_T.to(CUDA), classes=classes)
    model.cpu()
    assert gpu.device.type == "cuda"
    return gpu.cpu(), cpu


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
        grad_norm, losses, bad = td.train_step(forward, gd, td.Batch(x, t, noise), optimizer, scaler, 1.0,
                                               micro_batches=micro_batches)
        assert not bad.item()
    return Steps(torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu(), losses.cpu(),
                 grad_norm.cpu())


class Steps(NamedTuple):
    weights: torch.Tensor  # all parameters after the steps, flat
    losses: torch.Tensor   # per image, of the last step
    grad_norm: torch.Tensor  # of the last step, before clipping


def assert_same_steps(steps, reference, loss_tol=1e-5, min_cosine=0.999, start=None):
    """Same losses and gradient norm (a wrongly scaled gradient shows here: AdamW's update would hide
    it), and updates pointing the same way from start (default: tiny_unet()'s weights). The weights
    are not compared one by one: AdamW's normalised step turns rounding in a near-zero gradient into
    a step of +-lr."""
    torch.testing.assert_close(steps.losses, reference.losses, atol=loss_tol, rtol=loss_tol)
    torch.testing.assert_close(steps.grad_norm, reference.grad_norm, atol=0, rtol=max(loss_tol, 1e-4))
    start = flat(tiny_unet().parameters()) if start is None else start
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
        grad_norm, losses, _ = td.train_step(model, gd, td.Batch(x, t, noise), optimizer, scaler, 1.0)
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


def test_the_real_configuration_compiled_bf16_channels_last_fused_trains_as_fp32_does(fp32):
    # what train() runs on a GPU with --compile: torch.compile inside bf16 autocast, channels-last, fused AdamW
    steps = train_steps(amp_dtype=torch.bfloat16, channels_last=True, compile=True)
    assert_same_steps(steps, fp32, loss_tol=0.02, min_cosine=0.95)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_step_under_fused_adamw_leaves_weights_moments_and_step_counts_bitwise_alone(poison):
    # step_unless hands fused AdamW the bad flag as found_inf: the kernel skips on the device and the
    # step counts it added are taken back. As train() runs it: bf16, channels-last.
    model = td.place_model(tiny_unet(), CUDA, True)
    forward = td.Precision(model, CUDA, torch.bfloat16, True)
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3, fused_adamw=True))
    assert optimizer.defaults.get("fused"), "CUDA has the fused AdamW kernel"
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    gd = diffusion().to(CUDA)

    def step(seed, poisoned=False):
        x, t, noise = batch(seed=seed)
        if poisoned:
            x[0, 0, 0, 0] = poison
        return td.train_step(forward, gd, td.Batch(x, t, noise), optimizer, scaler, 1.0)

    def state():
        params = list(model.parameters())
        return ([p.detach().clone() for p in params],
                [{key: value.clone() for key, value in optimizer.state[p].items()} for p in params])

    assert not step(0)[2].item()
    weights, moments = state()
    assert all(m.keys() == {"step", "exp_avg", "exp_avg_sq"} for m in moments)
    _, losses, bad = step(1, poisoned=True)
    assert bad.item() and not torch.isfinite(losses).all()
    weights_after, moments_after = state()
    for i, (before, after) in enumerate(zip(weights, weights_after)):
        assert torch.equal(before, after), f"parameter {i} changed"
    for i, (before, after) in enumerate(zip(moments, moments_after)):
        for key in before:
            assert torch.equal(before[key], after[key]), f"{key} of parameter {i} changed"
    assert all(m["step"].item() == 1 for m in moments_after)
    # the next good step is taken: the skip does not stick
    assert not step(2)[2].item()
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def conditional_steps(device, labels):
    """train_step of the class-conditional tiny UNet on device, one step per (B,) label tensor."""
    model = tiny_unet(num_classes=3).to(device)
    forward = td.Precision(model, device)
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3, fused_adamw=False))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    gd = diffusion().to(device)
    for step, y in enumerate(labels):
        x, t, noise = batch(seed=step, device=device)
        grad_norm, losses, bad = td.train_step(forward, gd, td.Batch(x, t, noise, y.to(device)), optimizer, scaler, 1.0)
        assert not bad.item()
    return Steps(flat(model.parameters()), losses.cpu(), grad_norm.cpu())


def test_class_conditional_steps_with_labels_dropped_on_the_gpu_equal_the_cpu_steps():
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(7)).to(CUDA)
    labels = [td.drop_labels(y, 0.5, 0, step, len(y)) for step in range(3)]  # drawn on the labels' device
    for dropped in labels:
        kept = dropped >= 0
        assert dropped.device.type == "cuda" and 0 < kept.sum() < len(y)
        assert torch.equal(dropped[kept], y[kept]) and (dropped[~kept] == -1).all()
    assert torch.equal(td.drop_labels(y, 0.5, 0, 0, len(y)), labels[0]), "a function of (seed, step) alone"
    gpu = conditional_steps(CUDA, labels)
    cpu = conditional_steps(torch.device("cpu"), [dropped.cpu() for dropped in labels])  # the same labels
    assert torch.isfinite(gpu.losses).all()
    assert_same_steps(gpu, cpu, loss_tol=1e-4, start=flat(tiny_unet(num_classes=3).parameters()))


def fixed_x_t(n=4):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_sampling_on_the_gpu_draws_the_cpu_images_for_a_fixed_x_t():
    model, x_T = sampling_unet(), fixed_x_t()
    for sampler, steps in (("ddim", 20), ("dpmpp2m", 10)):
        gpu, cpu = sample_on_both(model, x_T, sampler=sampler, steps=steps)
        torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0, msg=sampler)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_ancestral_sampling_in_fewer_steps_on_the_gpu_takes_the_cpu_chain(var_type, monkeypatch):
    model, x_T = sampling_unet(), fixed_x_t()
    # the respaced chain of 10 of the 100 steps: the same tables (built on the host), the same p(x_{t-1} | x_t)
    timesteps = td.timestep_grid(100, 10, "uniform")
    cpu_chain, gpu_chain = diffusion().respace(timesteps), diffusion().to(CUDA).respace(timesteps)
    for name, table in cpu_chain.named_buffers():
        assert getattr(gpu_chain, name).device.type == "cuda" and torch.equal(getattr(gpu_chain, name).cpu(), table), name
    g = torch.Generator().manual_seed(4)
    eps, x = 3 * torch.randn(2, 4, 3, 16, 16, generator=g)  # x_0 predictions well out of [-1, 1]
    t = torch.tensor([0, 3, 6, 9])
    for clip in ("static", "dynamic", "none"):
        cpu = cpu_chain.p_mean_variance(eps, x, t, clip, var_type)
        gpu = gpu_chain.p_mean_variance(eps.to(CUDA), x.to(CUDA), t.to(CUDA), clip, var_type)
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5, msg=clip)
    # The whole chain, with the CUDA generator's per-step noise replaced by the same host draws on both
    # devices (the two generators' streams differ): every step on the GPU must follow the CPU's.
    real_randn = torch.randn

    def same_noise_run(where):
        host, devices = torch.Generator().manual_seed(5), []

        def randn(*size, generator=None, device=None, **kwargs):
            devices.append(torch.device(device))
            return real_randn(*size, generator=host, **kwargs).to(device)
        monkeypatch.setattr(torch, "randn", randn)
        try:
            with torch.no_grad():
                x = diffusion().to(where).sample(model.to(where), x_T.shape, td.SamplingSpec("ddpm", 10, var_type=var_type),
                                                 noise=x_T.to(where))
        finally:
            monkeypatch.undo()
            model.cpu()
        assert len(devices) == 9 and {d.type for d in devices} == {where.type}, devices  # no noise at the last step
        return x
    gpu, cpu = same_noise_run(CUDA), same_noise_run(torch.device("cpu"))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)
    # and as generate_samples draws it: x_T and the noise from a CUDA generator
    with torch.no_grad():
        x = diffusion().to(CUDA).sample(model.to(CUDA), (4, 3, 16, 16), td.SamplingSpec("ddpm", 10, var_type=var_type),
                                        generator=torch.Generator(CUDA).manual_seed(0))
    model.cpu()
    assert x.device.type == "cuda" and x.shape == (4, 3, 16, 16)
    assert torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-6  # the last step is the clamped x_0


def test_dynamic_thresholding_on_the_gpu_draws_the_cpu_images_for_a_fixed_x_t():
    model, x_T = sampling_unet(), fixed_x_t()
    for sampler, steps in (("ddim", 20), ("dpmpp2m", 10)):
        gpu, cpu = sample_on_both(model, x_T, sampler=sampler, steps=steps, clip_x0="dynamic")
        torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0, msg=sampler)
        with torch.no_grad():
            static = diffusion().sample(model, x_T.shape, td.SamplingSpec(sampler, steps), noise=x_T)
        assert (cpu - static).abs().max() > 0.01, "the thresholds were above 1: dynamic differs from static"


def test_classifier_free_guidance_on_the_gpu_draws_the_cpu_images_for_a_fixed_x_t():
    model, x_T = sampling_unet(num_classes=3), fixed_x_t()
    classes = torch.tensor([0, 1, 2, -1])
    for sampler, steps in (("ddim", 20), ("dpmpp2m", 10)):
        gpu, cpu = sample_on_both(model, x_T, sampler=sampler, steps=steps, classes=classes, guidance_scale=2.0)
        torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0, msg=sampler)


def test_fid_features_on_the_gpu_equal_the_cpu_features():
    import torchvision
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    extractor = td.InceptionPool3(net).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cpu = td.compute_activations(images, extractor, batch_size=3, progress=False)
    gpu = td.compute_activations(images, extractor.to(CUDA), batch_size=3, device=CUDA, progress=False)
    # A randomly initialised Inception's features span orders of magnitude: a tolerance in their scale.
    scale = float(np.abs(cpu).max())
    assert np.isfinite(cpu).all() and scale > 0
    np.testing.assert_allclose(gpu, cpu, atol=1e-3 * scale, rtol=1e-3)


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


# --- The command line on the GPU: sample, eval, resume across memory layouts ------------------------

def unet_line(result):
    """The line train() prints about the UNet, its device, precision and layout."""
    return next(line for line in result.stdout.splitlines() if line.startswith("UNet:"))


def assert_trained_on(result, run_dir, step, channels_last):
    """A successful CUDA session of the run that ended at step, in the auto precision, with fused AdamW,
    in the given layout, whose last logged steps were all taken."""
    assert_ok(result)
    line = unet_line(result)
    assert "| cuda" in line and f"{td.precision_name(td.autocast_dtype('auto', CUDA))} autocast" in line, line
    assert ("channels_last" in line) == channels_last, line
    assert "no fused AdamW" not in result.stdout
    ckpt = load_ckpt(run_dir / "latest.pt")
    assert ckpt["step"] == step and ckpt["config"]["device"] == "cuda"
    assert all(s["step"] == step for s in ckpt["optimizer"]["state"].values()), "Adam's step counts go on"
    last = test_cli.read_loss_log(run_dir / "loss_log.csv")[-1]
    assert (last["step"], last["bad_steps"]) == (str(step), "0") and np.isfinite(float(last["loss"])), last


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, cifar_dir):
    """The tiny run through the command line: 2 steps on the CPU (NCHW), resumed on the GPU for 2 more
    (channels-last by default there, fused AdamW, the auto precision). Returns (run folder, resume result)."""
    root = tmp_path_factory.mktemp("gpu_run")
    cpu_flags = [*TINY, "--device", "cpu", "--val_size", "0", "--sample_every", "0", "--data_dir", cifar_dir]
    assert_ok(run_cli(*cpu_flags, "--max_steps", "2", cwd=root))
    run_dir = root / "checkpoints" / test_cli.RUN
    assert load_ckpt(run_dir / "latest.pt")["step"] == 2
    return run_dir, run_cli("--run_name", test_cli.RUN, "--resume", "latest", "--device", "cuda", "--max_steps", "4",
                            cwd=root)


def test_a_cpu_run_resumes_on_the_gpu_in_channels_last_with_fused_adamw(gpu_run):
    # NCHW Adam moments from the CPU meet channels-last parameters: lay_out_like_params must match them
    run_dir, result = gpu_run
    assert_trained_on(result, run_dir, 4, channels_last=True)


def test_a_gpu_run_resumes_with_channels_last_switched_off(gpu_run, tmp_path):
    # channels-last Adam moments from the GPU session's checkpoint meet NCHW parameters
    assert_ok(gpu_run[1])
    shutil.copytree(gpu_run[0], tmp_path / "checkpoints" / test_cli.RUN)
    result = run_cli("--run_name", test_cli.RUN, "--resume", "latest", "--channels_last", "false",
                     "--max_steps", "6", cwd=tmp_path)
    assert_trained_on(result, tmp_path / "checkpoints" / test_cli.RUN, 6, channels_last=False)


@pytest.mark.parametrize("sampler_args, prefix", [
    (["--sampler", "ddpm", "--sampling_steps", "10", "--var_type", "fixedsmall"], "samples_ddpm10_fixedsmall"),
    (["--sampler", "dpmpp2m", "--sampling_steps", "10"], "samples_dpmpp2m10"),
], ids=["ddpm-10-steps-fixedsmall", "dpmpp2m"])
def test_sampling_a_gpu_run_on_the_gpu_writes_its_images(gpu_run, tmp_path, sampler_args, prefix):
    assert_ok(gpu_run[1])
    result = run_cli("--mode", "sample", "--checkpoint", gpu_run[0], "--device", "cuda", *sampler_args,
                     "--num_samples", "6", "--batch_size", "4", "--out", tmp_path / "out", cwd=tmp_path)
    assert_ok(result)
    test_cli.check_sample_outputs(tmp_path / "out", prefix, n=6)  # grid, PNGs and the .npz they match


def random_fid_weights(path):
    """A state dict of the FID Inception's architecture (built as td.build_fid_inception builds it) with
    He-initialised random convolutions, so that --mode eval runs offline: its scores mean nothing,
    the CUDA path through it is what is checked."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(192, pool_features=32), FIDInceptionA(256, pool_features=64),
                                                FIDInceptionA(288, pool_features=64))
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, channels_7x7=c) for c in (128, 160, 160, 192))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_eval_of_a_gpu_run_on_the_gpu_scores_and_logs_its_samples(gpu_run, cifar_dir, tmp_path):
    pytest.importorskip("pytorch_fid")
    assert_ok(gpu_run[1])
    run = tmp_path / "checkpoints" / test_cli.RUN  # a copy: eval writes its log and cache beside the run
    shutil.copytree(gpu_run[0], run)
    result = run_cli("--mode", "eval", "--checkpoint", run, "--device", "cuda", "--num_samples", "6",
                     "--sampler", "dpmpp2m", "--sampling_steps", "3", "--fid_weights",
                     random_fid_weights(tmp_path / "fid.pth"), "--data_dir", cifar_dir, cwd=tmp_path)
    assert_ok(result)
    precision = td.precision_name(td.autocast_dtype("auto", CUDA))
    assert re.search(rf"FID \d+\.\d+ .*FID@6: 6 samples \(dpmpp2m 3 steps, {precision}\) vs cifar10-train \(80 images\)",
                     result.stdout), result.stdout[-2000:]
    rows = test_cli.read_loss_log(run / "fid_log.csv")
    assert [(r["num_samples"], r["reference_n"], r["precision"]) for r in rows] == [("6", "80", precision)]
    assert np.isfinite(float(rows[0]["fid"])) and np.isfinite(float(rows[0]["kid"]))


def test_validation_psnr_on_the_gpu_equals_the_cpu():
    model = sampling_unet()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    cpu = td.Validator(images, 100, seed=0, batch_size=4).metrics(model, diffusion)
    gpu = td.Validator(images.to(CUDA), 100, seed=0, batch_size=4).metrics(model.to(CUDA), diffusion.to(CUDA))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert gpu[name] == pytest.approx(cpu[name], rel=1e-3, abs=1e-3), name


def test_lr_find_and_the_menus_rate_run_on_the_gpu(cifar_dir, tmp_path):
    result = run_cli(*TINY, "--device", "cuda", "--mode", "lr_find", "--lr_find_steps", "20", "--data_dir", cifar_dir,
                     cwd=tmp_path)
    assert_ok(result)
    assert "| learning rate | loss (smoothed) |" in result.stdout
    rate, timed = td.measure_training_rate(CUDA)
    assert rate > 1e9 and timed == "cifar10_optimized"
