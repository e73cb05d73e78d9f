"""diffusers interchange: the paper's model as diffusers publishes it, checked against diffusers itself.

google/ddpm-cifar10-32 cannot be downloaded here, so its config is written out below and filled with
random weights; our loader must then compute what diffusers' UNet2DModel computes, our exports must
load in diffusers' DDPMPipeline, and our samplers must take the steps diffusers' schedulers take.
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import train_ddpm as td
from test_fast_samplers import MixturePredictor
from test_cli import assert_ok, assert_one_line_error, load_ckpt, run_cli, snapshot

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

# google/ddpm-cifar10-32's unet/config.json (the paper's CIFAR-10 model), key for key.
PAPER_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                  attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                  mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, act_fn="silu",
                  center_input_sample=False, time_embedding_type="positional")
PAPER_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       variance_type="fixed_small", clip_sample=True)
# Narrower, two levels, attention at full resolution only, 8 groups, PyTorch's eps, symmetric padding,
# a time embedding that is not 4x the width, and a cosine schedule.
REDUCED_UNET = dict(PAPER_UNET, sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                    norm_num_groups=8, norm_eps=1e-5, downsample_padding=1, time_embedding_dim=40)
REDUCED_SCHEDULER = dict(PAPER_SCHEDULER, num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")


def randomised(module, seed=0, scale=0.05):
    """Every weight random, the zero-initialised output layers included, so no part goes untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def diffusers_pipeline_folder(path, unet_config, scheduler_config, seed=0):
    unet = randomised(diffusers.UNet2DModel(**unet_config), seed)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_config)).save_pretrained(path)
    return unet


def inputs(size, batch=3, timesteps=1000, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, 3, size, size), generator=generator),
            torch.tensor([0, timesteps // 2, timesteps - 1][:batch]))


@pytest.mark.parametrize("unet_config, scheduler_config", [(PAPER_UNET, PAPER_SCHEDULER),
                                                           (REDUCED_UNET, REDUCED_SCHEDULER)],
                         ids=["paper", "reduced"])
def test_a_diffusers_pipeline_folder_loads_as_our_unet_computing_the_same_function(
        tmp_path, unet_config, scheduler_config):
    theirs = diffusers_pipeline_folder(tmp_path / "pipe", unet_config, scheduler_config)
    model, diffusion, cfg = td.load_checkpoint(tmp_path / "pipe", amp="off")
    x, t = inputs(unet_config["sample_size"], timesteps=scheduler_config["num_train_timesteps"])
    with torch.no_grad():
        want = theirs(x, t).sample
        got = model(x, t)
    assert want.abs().mean() > 0.01  # a function worth comparing
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert td.count_parameters(model) == sum(p.numel() for p in theirs.parameters())
    reference = diffusers.DDPMScheduler(**scheduler_config)
    assert torch.allclose(diffusion.alphas_cumprod.float(), reference.alphas_cumprod, atol=1e-6)
    assert cfg.timesteps == scheduler_config["num_train_timesteps"]


def test_the_paper_config_is_our_ddpm_paper_preset_and_the_reduced_one_its_own_fields(tmp_path):
    paper = td.config_from_diffusers(PAPER_UNET, PAPER_SCHEDULER, "paper")
    preset = td.preset_config("ddpm_paper", {})
    assert {f: getattr(paper, f) for f in td.ARCHITECTURE_FIELDS} == {f: getattr(preset, f) for f in td.ARCHITECTURE_FIELDS}
    reduced = td.config_from_diffusers(REDUCED_UNET, REDUCED_SCHEDULER, "reduced")
    assert (reduced.image_size, reduced.base_channels, reduced.channel_mults, reduced.num_res_blocks) == (16, 16, (1, 2), 1)
    assert (reduced.attn_resolutions, reduced.norm_groups, reduced.norm_eps, reduced.emb_dim) == ((16,), 8, 1e-5, 40)
    assert (reduced.downsample_padding, reduced.schedule_type, reduced.timesteps) == ("symmetric", "cosine", 50)


def test_a_lone_unet_folder_with_old_attention_names_in_a_bin_file_loads_with_the_default_schedule(tmp_path):
    theirs = randomised(diffusers.UNet2DModel(**REDUCED_UNET))
    folder = tmp_path / "unet_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(REDUCED_UNET))
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for name, tensor in theirs.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        state[name] = tensor
    assert any(".query." in name for name in state)
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    model, diffusion, cfg = td.load_checkpoint(folder, amp="off")
    x, t = inputs(16)
    with torch.no_grad():
        assert torch.allclose(model(x, t), theirs(x, t).sample, atol=1e-5, rtol=0)
    assert (cfg.schedule_type, cfg.timesteps, cfg.beta_start, cfg.beta_end) == ("linear", 1000, 1e-4, 0.02)
    # the flat layout of early hub folders: the scheduler's config beside the UNet's
    (folder / "scheduler_config.json").write_text(json.dumps(REDUCED_SCHEDULER))
    _, _, cfg = td.load_checkpoint(folder, amp="off")
    assert (cfg.schedule_type, cfg.timesteps) == ("cosine", 50)


def our_checkpoint(path, cfg, seed=0):
    """A checkpoint file of ours with random (distinct) model and EMA weights."""
    model, ema = randomised(td.build_model(cfg), seed), randomised(td.build_model(cfg), seed + 1)
    torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), config=td.asdict(cfg), step=7, epoch=1), path)
    return model, ema


def loading_warnings(caplog, load):
    """What diffusers logs (at WARNING or above) while load() runs, and load()'s result."""
    diffusers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            result = load()
    finally:
        diffusers.utils.logging.disable_propagation()
    # The one warning allowed is about the environment, not the folder: no accelerate package here.
    return [r.getMessage() for r in caplog.records if "`accelerate`" not in r.getMessage()], result


@pytest.mark.parametrize("overrides, raw", [
    (dict(preset="ddpm_paper"), False),
    (dict(preset="quick_test", image_size=16, channel_mults=(1, 2), attn_resolutions=(16,), norm_groups=8,
          emb_dim=40, schedule_type="cosine", timesteps=50, downsample_padding="symmetric", norm_eps=1e-5,
          clip_x0="dynamic"), True),
    # every preset's model, narrowed to two levels of one block (its widths, so its group counts, kept)
    *[(dict(preset=name, image_size=16, channel_mults=td.Config(**td.PRESETS[name]).channel_mults[:2],
            num_res_blocks=1, class_conditional=False,
            **({} if td.Config(**td.PRESETS[name]).use_attention else dict(attn_resolutions=()))),  # no attention reads back as ()
      False) for name in td.PRESETS],
], ids=["paper-ema", "reduced-raw", *td.PRESETS])
def test_our_checkpoint_exported_to_diffusers_loads_without_warnings_and_computes_the_same_function(
        tmp_path, caplog, overrides, raw):
    cfg = td.Config(**{**td.PRESETS[overrides["preset"]], **overrides})
    model, ema = our_checkpoint(tmp_path / "ours.pt", cfg)
    assert_ok(run_cli("--mode", "sample", "--checkpoint", "ours.pt", "--export_diffusers", "exported",
                      *(["--no_ema"] if raw else []), cwd=tmp_path))
    messages, pipeline = loading_warnings(caplog, lambda: diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported"))
    assert messages == [], messages
    _, info = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    x, t = inputs(cfg.image_size, timesteps=cfg.timesteps)
    with torch.no_grad():
        want = (model if raw else ema)(x, t)
        assert torch.allclose(pipeline.unet(x, t).sample, want, atol=1e-5, rtol=0)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    ours = td.build_diffusion(cfg)
    assert torch.allclose(theirs.alphas_cumprod, ours.alphas_cumprod.float(), atol=1e-6)
    assert theirs.config.prediction_type == "epsilon" and theirs.config.variance_type == "fixed_large"
    assert (theirs.config.clip_sample, theirs.config.thresholding) == (True, cfg.clip_x0 == "dynamic")
    # and back: the exported folder is a checkpoint of ours again, with the same weights and clipping
    back, _, back_cfg = td.load_checkpoint(tmp_path / "exported", amp="off")
    assert {f: getattr(back_cfg, f) for f in td.ARCHITECTURE_FIELDS} == {f: getattr(cfg, f) for f in td.ARCHITECTURE_FIELDS}
    assert back_cfg.clip_x0 == cfg.clip_x0
    with torch.no_grad():
        assert torch.allclose(back(x, t), want, atol=1e-6, rtol=0)


# --- Our samplers take the steps of diffusers' schedulers --------------------------------------------

def shared_model(diffusion):
    """One noise predictor for both libraries: the exact one of a two-bump Gaussian mixture, so the
    chains stay in range with or without clipping and differ only where the methods differ."""
    means = torch.linspace(-0.6, 0.6, 2 * 3 * 8 * 8).reshape(2, -1)
    exact = MixturePredictor(diffusion, means, [0.2, 0.3], [0.4, 0.6])

    def model(x, t):
        return exact(x, torch.as_tensor(t).long().reshape(-1).expand(x.shape[0]))
    return model


def diffusers_loop(scheduler, model, x_T, seed, **step_kwargs):
    generator, x = torch.Generator().manual_seed(seed), x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.mark.parametrize("steps, spacing, var_type, clip", [
    (None, "uniform", "fixedlarge", "static"), (50, "uniform", "fixedsmall", "static"),
    (40, "uniform", "fixedlarge", "none")])
def test_ddpm_takes_the_steps_of_diffusers_ddpm_scheduler(steps, spacing, var_type, clip):
    # Grids that end at t = 0 only: on one that ends above it (trailing), diffusers adds noise at the
    # last step too ("if t > 0"), where the reverse chain's last step is its mean.
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 1000))
    model = shared_model(diffusion)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    theirs = diffusers.DDPMScheduler(**SCHEDULE, variance_type=var_type.replace("fixed", "fixed_"),
                                     clip_sample=clip == "static",
                                     timestep_spacing="linspace" if spacing == "uniform" else spacing)
    theirs.set_timesteps(steps or 1000)
    ours_timesteps = td.strided_timesteps(1000, steps or 1000, spacing, diffusion.alphas_cumprod)
    assert theirs.timesteps.flip(0).tolist() == ours_timesteps.tolist()
    want = diffusers_loop(theirs, model, x_T, seed=5)
    got = diffusion.sample(model, x_T.shape, td.SamplingSpec("ddpm", steps or 0, spacing, var_type=var_type, clip_x0=clip),
                           noise=x_T, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("eta, clip", [(0.0, "none"), (1.0, "static")])
def test_ddim_takes_the_steps_of_diffusers_ddim_scheduler(eta, clip):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 1000))
    model = shared_model(diffusion)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    # diffusers' DDIM always steps back by T // K, so the shared grid is the trailing one
    theirs = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=clip == "static", set_alpha_to_one=True,
                                     timestep_spacing="trailing")
    theirs.set_timesteps(50)
    want = diffusers_loop(theirs, model, x_T, seed=5, eta=eta, use_clipped_model_output=True)
    got = diffusion.sample(model, x_T.shape, td.SamplingSpec("ddim", 50, "trailing", eta=eta, clip_x0=clip), noise=x_T,
                           generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def out_of_range_model(diffusion):
    """The exact noise predictor of data beyond [-1, 1], whose x0 predictions the rules must hold in."""
    means = torch.linspace(-1.8, 1.8, 2 * 3 * 8 * 8).reshape(2, -1)
    exact = MixturePredictor(diffusion, means, [0.2, 0.3], [0.4, 0.6])
    return lambda x, t: exact(x, torch.as_tensor(t).long().reshape(-1).expand(x.shape[0]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_dynamic_thresholding_takes_the_steps_of_diffusers_thresholding(sampler):
    diffusion = td.GaussianDiffusion(td.make_beta_schedule("linear", 1000))
    model = out_of_range_model(diffusion)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    clip = {**td.DIFFUSERS_CLIP["dynamic"]}
    if sampler == "ddpm":
        theirs = diffusers.DDPMScheduler(**SCHEDULE, variance_type="fixed_large", timestep_spacing="linspace", **clip)
        theirs.set_timesteps(50)
        ours = dict(steps=50)
    elif sampler == "ddim":
        theirs = diffusers.DDIMScheduler(**SCHEDULE, set_alpha_to_one=True, timestep_spacing="trailing", **clip)
        theirs.set_timesteps(50)
        ours = dict(steps=50, spacing="trailing")
    else:
        del clip["clip_sample"], clip["clip_sample_range"]  # DPM-Solver has thresholding only
        theirs = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                       solver_type="midpoint", final_sigmas_type="zero", **clip)
        theirs.set_timesteps(timesteps=td.strided_timesteps(1000, 20, "logsnr", diffusion.alphas_cumprod).flip(0).tolist())
        ours = dict(steps=20)
    want = diffusers_loop(theirs, model, x_T, seed=5, **({"use_clipped_model_output": True} if sampler == "ddim" else {}))
    run = lambda clip: diffusion.sample(model, x_T.shape, td.SamplingSpec(sampler, clip_x0=clip, **ours),  # noqa: E731
                                        noise=x_T, generator=torch.Generator().manual_seed(5))
    got = run("dynamic")
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert (got - run("static")).abs().max() > 0.1  # the data is out of range: the rules differ here


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_dpm_solver_takes_the_steps_of_diffusers_dpm_solver_multistep_2m(schedule):
    kind = "linear" if schedule == "linear" else "cosine"
    diffusion = td.GaussianDiffusion(td.make_beta_schedule(kind, 1000))
    model = shared_model(diffusion)
    x_T = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    ours_timesteps = td.strided_timesteps(1000, 20, "logsnr", diffusion.alphas_cumprod)
    theirs = diffusers.DPMSolverMultistepScheduler(**{**SCHEDULE, "beta_schedule": schedule},
                                                   algorithm_type="dpmsolver++", solver_order=2,
                                                   solver_type="midpoint", final_sigmas_type="zero")
    theirs.set_timesteps(timesteps=ours_timesteps.flip(0).tolist())  # diffusers' own grids differ in detail
    want = diffusers_loop(theirs, model, x_T, seed=5)
    got = diffusion.sample(model, x_T.shape, td.SamplingSpec("dpmpp2m", 20, clip_x0="none"), noise=x_T)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


# --- The command line ------------------------------------------------------------------------------

def write_image_folder(folder, n, size, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_fine_tune_a_diffusers_folder_then_sample_export_and_load_it_back(tmp_path):
    """--init_from a pipeline folder: the run takes its architecture and schedule and starts from its
    weights; two steps later it samples, exports to diffusers, and the export samples too."""
    theirs = diffusers_pipeline_folder(tmp_path / "pipe", REDUCED_UNET, REDUCED_SCHEDULER)
    write_image_folder(tmp_path / "images", n=20, size=16)
    common = ["--preset", "quick_test", "--dataset", "folder", "--data_dir", "images", "--train_subset", "0",
              "--batch_size", "16", "--image_size", "16", "--num_workers", "0", "--preview_steps", "5", "--num_preview", "2", "--val_size", "0"]
    # a flag that contradicts the folder is refused before anything is written
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(*common, "--init_from", "pipe", "--timesteps", "100", cwd=tmp_path),
                          "--timesteps 100", "timesteps=50")
    assert snapshot(tmp_path) == before
    # two steps with a learning rate of ~0 (during warmup): the weights stay those of the folder
    result = run_cli(*common, "--init_from", "pipe", "--max_steps", "2", "--learning_rate", "1e-12", "--min_lr", "0",
                     "--run_name", "tuned", cwd=tmp_path)
    assert_ok(result)
    ckpt = load_ckpt(tmp_path / "checkpoints" / "tuned" / "latest.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["init_from"] == "pipe"
    assert ckpt["config"]["timesteps"] == 50 and ckpt["config"]["schedule_type"] == "cosine"
    assert ckpt["config"]["norm_groups"] == 8 and ckpt["config"]["emb_dim"] == 40
    model = td.build_model(td.config_from_dict(ckpt["config"])).eval()
    model.load_state_dict(ckpt["ema"])
    x, t = inputs(16, timesteps=50)
    with torch.no_grad():
        assert torch.allclose(model(x, t), theirs(x, t).sample, atol=1e-4, rtol=0)

    assert_ok(run_cli("--mode", "sample", "--checkpoint", "checkpoints/tuned", "--num_samples", "4",
                      "--sampler", "ddim", "--sampling_steps", "5", "--out", "from_run", cwd=tmp_path))
    assert_ok(run_cli("--mode", "sample", "--checkpoint", "checkpoints/tuned", "--export_diffusers", "exported",
                      cwd=tmp_path))
    reloaded = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        assert torch.allclose(reloaded.unet(x, t).sample, model(x, t), atol=1e-5, rtol=0)
    for folder in ("exported", "pipe"):  # a pipeline folder samples like a checkpoint
        result = run_cli("--mode", "sample", "--checkpoint", folder, "--num_samples", "4", "--sampler", "dpmpp2m",
                         "--sampling_steps", "5", cwd=tmp_path)
        assert_ok(result)
        assert len(list((tmp_path / "samples" / folder).glob("samples_dpmpp2m5_seed0/*.png"))) == 4
    # exporting twice into the same folder is refused and keeps the first export
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli("--mode", "sample", "--checkpoint", "checkpoints/tuned", "--export_diffusers",
                                  "exported", cwd=tmp_path), "exported", "already exists")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where, key, value", [
    ("scheduler", "variance_type", "learned_range"),
    ("scheduler", "beta_schedule", "scaled_linear"),
    ("scheduler", "sample_max_value", 1.5),  # with thresholding: capped dynamic thresholding
    ("unet", "down_block_types", ["CrossAttnDownBlock2D", "DownBlock2D"]),
    ("unet", "attention_head_dim", 8),
    ("unet", "flip_sin_to_cos", True),
], ids=lambda v: str(v) if not isinstance(v, list) else "blocks")
def test_a_diffusers_config_we_cannot_reproduce_is_refused_naming_the_key(where, key, value):
    unet, scheduler = dict(REDUCED_UNET), dict(REDUCED_SCHEDULER, thresholding=True)
    {"unet": unet, "scheduler": scheduler}[where][key] = value
    with pytest.raises(td.UserError, match=key):
        td.config_from_diffusers(unet, scheduler, "pipe")


def test_the_command_line_refuses_such_a_folder_in_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "pipe"
    diffusers_pipeline_folder(folder, REDUCED_UNET, REDUCED_SCHEDULER)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli("--mode", "sample", "--checkpoint", folder, cwd=tmp_path), "prediction_type",
                          "v_prediction", "pipe")
    assert snapshot(tmp_path) == before


def test_export_refuses_what_unet2dmodel_cannot_express_and_writes_nothing(tmp_path):
    # 32 groups give a 16-wide level 4 groups (4 channels each) and a 32-wide one 8: UNet2DModel has one count
    cfg = td.Config(**{**td.PRESETS["quick_test"], "base_channels": 16, "timesteps": 20, "norm_groups": 32})
    our_checkpoint(tmp_path / "ours.pt", cfg)
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli("--mode", "sample", "--checkpoint", "ours.pt", "--export_diffusers", "out",
                                  cwd=tmp_path), "norm_num_groups=32", "16")
    assert snapshot(tmp_path) == before


def test_a_checkpoint_from_before_the_paper_padding_and_eps_still_samples_as_it_was_trained(tmp_path):
    """A checkpoint whose config predates norm_eps and downsample_padding was trained with PyTorch's
    eps 1e-5 and padding on every side: diffusers' UNet2DModel with exactly those settings
    (downsample_padding=1, norm_eps=1e-5) gives the images our sampler makes from it."""
    cfg = td.Config(**{**td.PRESETS["quick_test"], "base_channels": 32, "channel_mults": (1, 2), "timesteps": 20,
                       "beta_start": 0.005, "beta_end": 0.999, "norm_eps": 1e-5, "downsample_padding": "symmetric",
                       "norm_min_channels": 1, "norm_groups": 32})  # quick_test's groups then
    _, ema = our_checkpoint(tmp_path / "old.pt", cfg)
    ckpt = load_ckpt(tmp_path / "old.pt")
    for new_field in ("norm_eps", "downsample_padding", "norm_min_channels"):  # as written before they existed
        del ckpt["config"][new_field]
    torch.save(ckpt, tmp_path / "old.pt")
    assert_ok(run_cli("--mode", "sample", "--checkpoint", "old.pt", "--sampler", "ddim", "--sampling_steps", "5",
                      "--num_samples", "4", "--amp", "off", "--out", "out", cwd=tmp_path))
    samples = np.load(next((tmp_path / "out").glob("*.npz")))["arr_0"]

    legacy = diffusers.UNet2DModel(**{**PAPER_UNET, "block_out_channels": (32, 64), "layers_per_block": 1,
                                      "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),  # attention at 16x16
                                      "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "time_embedding_dim": 128,
                                      "downsample_padding": 1, "norm_eps": 1e-5}).eval()
    legacy.load_state_dict(td.state_to_diffusers(ema.state_dict(), cfg))

    def sample_with(net):
        generator = torch.Generator().manual_seed(td.derived_seed(cfg.seed, 0, td.SAMPLE_BATCH))
        x = td.build_diffusion(cfg).sample(net, (4, 3, 32, 32), td.SamplingSpec("ddim", 5), generator=generator)
        return td.to_uint8(x).astype(int)

    assert np.abs(sample_with(lambda x, t: legacy(x, t).sample) - samples).max() <= 1
    today = td.build_model(td.dataclasses.replace(cfg, norm_eps=1e-6, downsample_padding="same",
                                                  norm_min_channels=4)).eval()
    today.load_state_dict(ema.state_dict())
    assert np.abs(sample_with(today) - samples).max() > 10  # the recorded values are what make it so
