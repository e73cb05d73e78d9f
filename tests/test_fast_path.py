"""The fast path and several processes: each speed switch computes what the plain path computes
(to float tolerance), and N processes under torchrun train as one process with the same global
batch. DDP runs use 2 gloo processes on the CPU through the real command line."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import OFFLINE, SCRIPT, TINY, assert_ok, assert_one_line_error, load_ckpt, read_loss_log, run_cli
import test_cli

cifar_dir = test_cli.cifar_dir  # fixtures shared with test_cli

BF16_CPU = td.cpu_has_native_bf16()


def tiny_unet(dropout=0.0, **overrides):
    torch.manual_seed(0)
    kwargs = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=dropout,
                  emb_dim=32, image_size=16)
    return td.UNet(td.Config(**{**kwargs, **overrides}))


def inputs(batch=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 100, (batch,), generator=g)


def grads(model, forward, x, t):
    model.zero_grad()
    forward(x, t).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


# --- The switches against the plain path ------------------------------------------------------------

def test_sdpa_attention_equals_softmax_attention_written_out():
    block = td.AttnBlock(32)
    torch.nn.init.normal_(block.proj.weight)  # the zero-initialised projection would hide everything
    x = torch.randn(2, 32, 8, 8)
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # (B, C, HW) each
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    expected = x + block.proj(torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_plain_outputs_and_gradients():
    plain, fast = tiny_unet(), tiny_unet()
    fast = td.place_model(fast, torch.device("cpu"), channels_last=True)
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = inputs()
    plain_call = td.Precision(plain, torch.device("cpu"))
    fast_call = td.Precision(fast, torch.device("cpu"), channels_last=True)
    torch.testing.assert_close(fast_call(x, t), plain_call(x, t), atol=1e-5, rtol=1e-4)
    for a, b in zip(grads(fast, fast_call, x, t), grads(plain, plain_call, x, t)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_unet_in_low_precision_but_returns_fp32_close_to_fp32(dtype):
    model = tiny_unet()
    for p in model.parameters():  # leave the zero init, so the output is not trivially zero
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t = inputs()
    reference = td.Precision(model, torch.device("cpu"))(x, t)
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    out = td.Precision(model, torch.device("cpu"), dtype)(x, t)
    hook.remove()
    assert seen == [dtype], "the convolutions ran in the autocast dtype"
    assert out.dtype == torch.float32
    error = (out - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error  # different (it did run in low precision), yet close


def test_the_diffusion_math_stays_in_full_precision_under_autocast():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    assert diffusion.betas.dtype == torch.float64
    model = td.Precision(tiny_unet(), torch.device("cpu"), torch.bfloat16)
    x, t = inputs()
    noise = torch.randn_like(x)
    with torch.no_grad():
        losses = diffusion.training_losses(model, x, t, noise)
        x_t = diffusion.q_sample(x, t, noise)
    assert losses.dtype == torch.float32 and x_t.dtype == torch.float32
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x + (1 - abar).sqrt() * noise)


def test_auto_picks_bf16_only_where_the_hardware_runs_it_natively():
    cpu = torch.device("cpu")
    assert td.autocast_dtype("auto", cpu) == (torch.bfloat16 if BF16_CPU else None)
    assert td.autocast_dtype("off", cpu) is None
    assert td.autocast_dtype("fp16", cpu) == torch.float16
    assert td.use_channels_last("auto", cpu) is False and td.use_channels_last("true", cpu) is True


def test_fused_adamw_takes_the_same_steps_as_the_plain_one():
    cfg = td.Config(learning_rate=1e-3, weight_decay=0.01)
    results = []
    for fused in (True, False):
        model = tiny_unet()
        optimizer = td.build_optimizer(model, td.Config(**{**td.asdict(cfg), "fused_adamw": fused}))
        assert optimizer.defaults.get("fused") in ((True,) if fused else (None, False))
        for seed in range(3):
            x, t = inputs(seed=seed)
            optimizer.zero_grad()
            model(x, t).square().mean().backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_the_foreach_ema_update_is_the_closed_form_average():
    model = tiny_unet()
    ema = td.EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=1000)  # past the decay warmup: decay 0.9
    for e, b, p in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_fp16_with_the_grad_scaler_trains_and_skips_an_overflowing_step():
    model, diffusion = tiny_unet(), td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    forward = td.Precision(model, torch.device("cpu"), torch.float16)
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    x, t = inputs()
    start = [p.detach().clone() for p in model.parameters()]
    td.train_step(forward, diffusion, td.Batch(x, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters())), "the step changed the weights"
    after_first = [p.detach().clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("inf")  # an overflow: the scaler must skip the update
    td.train_step(forward, diffusion, td.Batch(x_bad, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(after_first, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 16, "the scale backed off after the overflow"


def accumulated_step(micro_batches, amp_dtype=None, batch=8):
    """One train_step of a fresh tiny UNet on a fixed batch; returns (weights after, per-image losses, grad norm)."""
    model, diffusion = tiny_unet(), td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    forward = td.Precision(model, torch.device("cpu"), amp_dtype)
    optimizer = td.build_optimizer(model, td.Config(learning_rate=1e-3))
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    x, t = inputs(batch=batch)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    grad_norm, losses, bad = td.train_step(forward, diffusion, td.Batch(x, t, noise), optimizer, scaler, 1.0,
                                           micro_batches=micro_batches)
    assert not bad
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses, grad_norm


def test_gradient_accumulation_takes_the_whole_batch_step():
    whole, losses, norm = accumulated_step(1)
    for k in (2, 4):
        weights, k_losses, k_norm = accumulated_step(k)
        assert k_losses.shape == (8,)
        torch.testing.assert_close(k_losses, losses, atol=1e-6, rtol=1e-5)  # same t and noise per image
        torch.testing.assert_close(k_norm, norm, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weights, whole, atol=1e-7, rtol=1e-6)
    # A step on the first half alone is a different update: the comparison above can tell them apart.
    assert not torch.allclose(accumulated_step(1, batch=4)[0], whole, atol=1e-7, rtol=1e-6)


def test_gradient_accumulation_under_fp16_loss_scaling_matches_the_whole_batch():
    whole, losses, norm = accumulated_step(1, torch.float16)
    weights, k_losses, k_norm = accumulated_step(2, torch.float16)
    torch.testing.assert_close(k_losses, losses, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(k_norm, norm, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(weights, whole, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout_and_saves_fewer_activations():
    x, t = inputs()
    results = []
    for checkpointing in (False, True):
        model = tiny_unet(dropout=0.3)
        model.grad_checkpointing = checkpointing
        saved = {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        torch.manual_seed(5)  # the same dropout masks, which the recomputation must replay
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(x, t).square().mean()
        loss.backward()
        results.append(([p.grad.clone() for p in model.parameters()], sum(saved.values())))
    (plain_grads, plain_bytes), (ckpt_grads, ckpt_bytes) = results
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)
    with torch.no_grad():  # sampling never checkpoints
        model(x, t)


def test_torch_compile_gives_the_eager_outputs():
    model = tiny_unet()
    x, t = inputs()
    eager = model(x, t)
    compiled = torch.compile(model)(x, t)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# --- Sharding: N processes see what one process sees --------------------------------------------------

def test_the_shards_of_an_epoch_batch_make_up_the_whole_batch_labels_and_dropped_labels_too():
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    whole = list(td.epoch_batches(images, 8, epoch=3, seed=5, flip=True, labels=labels))
    shards = [td.Processes(r, 2).shard(8) for r in range(2)]
    parts = [list(td.epoch_batches(images, 8, 3, 5, True, shard=shard, labels=labels)) for shard in shards]
    for i, (batch, y) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), batch)
        assert torch.equal(torch.cat([parts[0][i][1], parts[1][i][1]]), y)
        for image, label in zip(batch, y):  # each image keeps its own label through shuffling
            source = labels[[torch.equal(image, im.float() / 127.5 - 1) or torch.equal(image, im.flip(2).float()
                                                                                     / 127.5 - 1) for im in images]]
            assert label in source
        dropped = td.drop_labels(y, 0.5, seed=5, step=i, batch_size=8)
        halves = [td.drop_labels(part[i][1], 0.5, 5, i, 8, shard) for part, shard in zip(parts, shards)]
        assert torch.equal(torch.cat(halves), dropped)
        assert torch.equal(dropped, td.drop_labels(y, 0.5, 5, i, 8))  # a function of (seed, step) alone
        assert torch.equal(dropped[dropped >= 0], y[dropped >= 0])
    every_drop = torch.cat([td.drop_labels(torch.zeros(1000, dtype=torch.long), 0.1, 5, s, 1000) for s in range(5)])
    assert abs((every_drop == -1).float().mean().item() - 0.1) < 0.02
    assert td.drop_labels(y, 0.0, 5, 0, 8) is y
    assert [x[1] for x in td.epoch_batches(images, 8, 3, 5, True)] == [None] * 5  # unconditional: no labels


def test_each_rank_draws_its_slice_of_the_global_timesteps_and_noise():
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 100, 1e-3, 0.2))
    g, training_noise = torch.Generator(), td.TrainingNoise(diffusion)
    t, noise = training_noise.draw((8, 3, 4, 4), slice(None), g, seed=1, step=7)
    halves = [training_noise.draw((8, 3, 4, 4), td.Processes(r, 2).shard(8), g, 1, 7) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), t)
    assert torch.equal(torch.cat([h[1] for h in halves]), noise)
    t_next, _ = training_noise.draw((8, 3, 4, 4), slice(None), g, seed=1, step=8)
    assert not torch.equal(t_next, t), "each step draws afresh"


# --- torchrun: DistributedDataParallel on 2 gloo processes ----------------------------------------

DDP_FLAGS = [*TINY, "--device", "cpu", "--amp", "off", "--val_size", "0", "--sample_every", "0"]


def torchrun(*args, cwd, nproc=2):
    env = {**__import__("os").environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def assert_close_state(a, b, what, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=f"{what}.{k}")


@pytest.fixture(scope="module")
def single_run(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    assert_ok(run_cli(*DDP_FLAGS, "--max_steps", "8", "--data_dir", cifar_dir, "--run_name", "one", cwd=root))
    return root / "checkpoints" / "one"


def two_nodes(*args, cwd):
    """torchrun on 2 "nodes" of 1 process each, as a cluster starts it (one launch per node, a c10d
    rendezvous at node 0's address), both nodes here on localhost. Returns node 0's result."""
    with __import__("socket").socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                  "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_id", "test",
                                  "--rdzv_endpoint", f"localhost:{port}", str(SCRIPT), *map(str, args)],
                                 cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 stdin=subprocess.DEVNULL) for node in (0, 1)]
    results = []
    for launch in launches:
        out, err = launch.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, out, err))
    assert_ok(results[1])
    return results[0] if "UNet:" in results[0].stdout else results[1]  # the node that got rank 0


def test_two_nodes_of_one_gloo_process_train_as_one_process_with_the_same_global_batch(single_run, cifar_dir, tmp_path):
    result = two_nodes(*DDP_FLAGS, "--max_steps", "8", "--data_dir", cifar_dir, "--run_name", "two", cwd=tmp_path)
    assert_ok(result)
    assert "x 2 processes" in result.stdout
    assert result.stdout.count("UNet:") == 1, "only rank 0 prints"
    one, two = load_ckpt(single_run / "latest.pt"), load_ckpt(tmp_path / "checkpoints" / "two" / "latest.pt")
    assert one["step"] == two["step"] == 8
    assert_close_state(one["model"], two["model"], "model")
    assert_close_state(one["ema"], two["ema"], "ema")
    # The logged loss averages all ranks' images: the single process's loss over the same images.
    rows_one, rows_two = read_loss_log(single_run / "loss_log.csv"), read_loss_log(tmp_path / "checkpoints" / "two" / "loss_log.csv")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "two").glob("*.pt")) == [
        "ddpm_ts20_epoch0001.pt", "ddpm_ts20_epoch0002.pt", "latest.pt"]


def test_a_ddp_run_checkpoints_and_resumes_to_the_uninterrupted_weights(single_run, cifar_dir, tmp_path):
    assert_ok(torchrun(*DDP_FLAGS, "--max_steps", "3", "--data_dir", cifar_dir, "--run_name", "r", cwd=tmp_path))
    resumed = torchrun(*DDP_FLAGS, "--max_steps", "8", "--data_dir", cifar_dir, "--run_name", "r", "--resume", "latest",
                       cwd=tmp_path)
    assert_ok(resumed)
    ckpt = load_ckpt(tmp_path / "checkpoints" / "r" / "latest.pt")
    assert ckpt["step"] == 8 and ckpt["session"] == 1
    assert_close_state(ckpt["model"], load_ckpt(single_run / "latest.pt")["model"], "model")
    steps = [int(r["step"]) for r in read_loss_log(tmp_path / "checkpoints" / "r" / "loss_log.csv")]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps


def test_num_gpus_launches_torchrun_itself_and_sample_mode_shards_the_same_images(single_run, cifar_dir, tmp_path):
    out_one, out_two = tmp_path / "one", tmp_path / "two"
    common = ["--mode", "sample", "--checkpoint", single_run, "--num_samples", "5", "--batch_size", "2",
              "--sampling_steps", "4", "--device", "cpu", "--amp", "off"]
    assert_ok(run_cli(*common, "--out", out_one, cwd=tmp_path))
    result = run_cli(*common, "--out", out_two, "--num_gpus", "2", cwd=tmp_path)
    assert_ok(result)
    assert "launching 2 processes" in result.stdout
    (a,), (b,) = out_one.glob("*.npz"), out_two.glob("*.npz")
    images_one, images_two = np.load(a)["arr_0"], np.load(b)["arr_0"]
    assert images_one.shape == (5, 32, 32, 3)
    assert np.array_equal(images_one, images_two)


def test_num_gpus_training_with_gradient_accumulation_equals_one_process(single_run, cifar_dir, tmp_path):
    # 2 processes x 2 micro-batches of 4 images: the gradients sync once per step, in the last backward
    result = run_cli(*DDP_FLAGS, "--max_steps", "8", "--data_dir", cifar_dir, "--run_name", "n", "--num_gpus", "2",
                     "--grad_accum", "2", cwd=tmp_path)
    assert_ok(result)
    ckpt = load_ckpt(tmp_path / "checkpoints" / "n" / "latest.pt")
    assert ckpt["config"]["grad_accum"] == 2 and ckpt["config"]["batch_size"] == 16
    assert_close_state(ckpt["model"], load_ckpt(single_run / "latest.pt")["model"], "model")
    rows = read_loss_log(tmp_path / "checkpoints" / "n" / "loss_log.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in read_loss_log(single_run / "loss_log.csv")], "whole steps"


@pytest.mark.parametrize("flags, fragment", [
    (["--num_gpus", "0"], "--num_gpus must be at least 1"),
    (["--num_gpus", "3"], "must be a multiple of --num_gpus 3"),
])
def test_bad_num_gpus_is_refused_before_launching(cifar_dir, tmp_path, flags, fragment):
    result = run_cli(*DDP_FLAGS, "--data_dir", cifar_dir, *flags, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "checkpoints").exists()


def test_fp16_training_through_the_command_line_saves_the_scaler_state(cifar_dir, tmp_path):
    # fp16 has no fast CPU kernels: two steps, no previews or validation, keep this short
    assert_ok(run_cli(*TINY, "--device", "cpu", "--amp", "fp16", "--max_steps", "2", "--sample_every", "0",
                      "--val_size", "0", "--data_dir", cifar_dir, cwd=tmp_path))
    ckpt = load_ckpt(tmp_path / "checkpoints" / "quick_test_ts20" / "latest.pt")
    assert ckpt["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("saved_layout, resumed_layout", [(False, True), (True, False)])
def test_resume_lays_out_the_adam_moments_like_each_parameter(saved_layout, resumed_layout):
    # a run saved in one memory layout and resumed in the other (CPU -> GPU turns channels_last on);
    # fused CUDA AdamW refuses a parameter and its state of different strides
    cfg = td.Config(**{**td.PRESETS["quick_test"], "base_channels": 16, "channel_mults": (1, 2), "timesteps": 20})
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)

    def build(channels_last):
        model = td.place_model(td.build_model(cfg), torch.device("cpu"), channels_last)
        optimizer = td.build_optimizer(model, cfg)
        return model, td.EMA(model, cfg.ema_decay), optimizer, td.LRSchedule(optimizer, cfg, 10)

    model, ema, optimizer, lr_schedule = build(saved_layout)
    td.GaussianDiffusion(td.make_beta_schedule("linear", 20)).training_losses(model, x, torch.arange(4)).mean().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    meter = td.Meter(torch.device("cpu"), 20)
    meter.start(1, 0.0)
    ckpt = td.TrainState(cfg, model, ema, optimizer, lr_schedule, scaler, meter, num_images=8, step=1).state_dict(0)
    model2, ema2, optimizer2, lr_schedule2 = build(resumed_layout)
    td.TrainState(cfg, model2, ema2, optimizer2, lr_schedule2, scaler, td.Meter(torch.device("cpu"), 20),
                  num_images=8).load_state_dict(ckpt)
    convs = [p for p in model2.parameters() if p.dim() == 4]
    assert convs and any(p.stride() != p.contiguous().stride() for p in convs) == resumed_layout
    for saved, param in zip(optimizer.param_groups[0]["params"], model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer2.state[param][key]
            assert state.stride() == param.stride(), key
            assert torch.equal(state, optimizer.state[saved][key])  # the values, exactly


def test_a_fallback_from_fused_adamw_is_said_once(monkeypatch, capsys):
    real = torch.optim.AdamW

    def no_fused_kernel(params, fused=None, **kwargs):  # as torch answers on a device without the kernel
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    model = torch.nn.Linear(2, 2)
    optimizer = td.build_optimizer(model, td.Config(fused_adamw=True))
    assert not optimizer.defaults.get("fused")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no fused AdamW" in out and "every step" in out
    td.build_optimizer(model, td.Config(fused_adamw=False))  # asked for unfused: nothing to say
    assert capsys.readouterr().out == ""


def test_tf32_is_set_through_the_api_the_running_torch_has():
    import warnings
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    try:
        for tf32 in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no deprecation warning from the legacy flags
                td.set_tf32(tf32)
            if new_api:
                want = "tf32" if tf32 else "ieee"
                assert torch.backends.cuda.matmul.fp32_precision == want
                assert torch.backends.cudnn.conv.fp32_precision == want
            else:
                assert torch.backends.cuda.matmul.allow_tf32 == tf32 and torch.backends.cudnn.allow_tf32 == tf32
    finally:
        td.set_tf32(False)


@pytest.mark.parametrize("world, checkpointing", [(1, True), (2, False), (2, True)])
def test_compile_splits_the_ddp_graph_unless_grad_checkpointing_runs_on_several_processes(world, checkpointing):
    import torch._dynamo
    with torch._dynamo.config.patch(optimize_ddp=True):
        compiled = td.compile_model(torch.nn.Linear(2, 2), td.Config(grad_checkpointing=checkpointing), world)
        assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily: no kernel built
        assert torch._dynamo.config.optimize_ddp == (not (world > 1 and checkpointing))
