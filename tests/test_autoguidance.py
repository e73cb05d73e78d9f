"""Autoguidance (Karras et al. 2024): a model guided by a weaker one of the same task, against exact
noise predictors, then through the real command line (sampling, previews and FID during training)."""

import importlib.util
import shlex

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import FID_WEIGHTS, RUN, TINY, assert_ok, assert_one_line_error, read_loss_log, run_cli, snapshot
from test_fast_samplers import MixturePredictor
from test_guidance import D, SAMPLERS, ConditionalOracle, diffusion
import test_cli

cifar_dir = test_cli.cifar_dir


class Counted:
    def __init__(self, predictor):
        self.predictor, self.calls = predictor, 0

    def __call__(self, *args):
        self.calls += 1
        return self.predictor(*args)


def draw(model, sampler, steps, n, scale, guide=None, classes=None, seed=0):
    x_T = torch.randn((n, 3, 2, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spec = td.SamplingSpec(sampler, steps, clip_x0="none", guidance_scale=scale, guide="guide" if guide else "")
    return diffusion().sample(model, x_T.shape, spec, noise=x_T, generator=torch.Generator().manual_seed(seed + 1),
                              classes=classes, guide=guide)


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_a_model_guided_by_itself_draws_what_it_draws_alone_for_every_w(sampler, steps):
    chain = diffusion()
    model = MixturePredictor(chain, [[0.5] * D, [-0.4] * D], [0.2, 0.3], [0.6, 0.4])
    alone = draw(model, sampler, steps, 64, 1.0)
    for scale in (0.0, 0.5, 2.0, 4.0):
        assert torch.equal(draw(model, sampler, steps, 64, scale, guide=model), alone), scale
    labels = torch.arange(3).repeat(8)
    oracle = ConditionalOracle(chain)
    conditional = draw(oracle, sampler, steps, len(labels), 1.0, classes=labels)
    assert torch.equal(draw(oracle, sampler, steps, len(labels), 3.0, guide=oracle, classes=labels), conditional)


@pytest.mark.parametrize("sampler, steps", SAMPLERS)
def test_autoguidance_between_two_gaussians_of_one_width_extrapolates_from_the_guide_to_the_model(sampler, steps):
    # eps_guide + w (eps_main - eps_guide) of N(mu_g, s^2) and N(mu_m, s^2) is exactly the noise
    # prediction of N(mu_g + w (mu_m - mu_g), s^2): that mean, the same width, for every w.
    chain = diffusion()
    mu_m, mu_g, s = 0.3, -0.1, 0.25
    main, guide = (Counted(MixturePredictor(chain, [[mu] * D], [s], [1.0])) for mu in (mu_m, mu_g))
    for scale in (1.0, 1.5, 2.5):
        main.calls = guide.calls = 0
        x = draw(main, sampler, steps, 2000, scale, guide=guide)
        assert abs(x.mean().item() - (mu_g + scale * (mu_m - mu_g))) < 0.01, (scale, x.mean())
        assert abs(x.std().item() - s) < 0.03 * s, (scale, x.std())
        assert guide.calls == (0 if scale == 1 else main.calls), "w = 1 is the model alone, without the guide"


def test_a_guide_needs_a_spec_that_names_it_and_a_named_guide_needs_its_model():
    model = MixturePredictor(diffusion(), [[0.0] * D], [0.5], [1.0])
    x_T = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="SamplingSpec.guide"):
        diffusion().sample(model, x_T.shape, td.SamplingSpec("ddim", 5), noise=x_T, guide=model)
    with pytest.raises(ValueError, match="SamplingSpec.guide"):
        diffusion().sample(model, x_T.shape, td.SamplingSpec("ddim", 5, guide="g"), noise=x_T)


# --- The command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar_dir):
    """Three epochs of the tiny model with power-EMA profiles: epoch 1 is a weaker guide for the last."""
    root = tmp_path_factory.mktemp("autoguided")
    result = run_cli(*TINY, "--epochs", "3", "--sample_every", "0", "--data_dir", cifar_dir, "--ema_profiles",
                     "0.05,0.12", "--ema_snapshot_every", "32", cwd=root)
    assert_ok(result)
    (root / "train.out").write_text(result.stdout)
    return root


def sample(root, *flags, out):
    assert_ok(run_cli("--mode", "sample", "--checkpoint", f"checkpoints/{RUN}", "--num_samples", "3",
                      "--sampler", "ddim", "--sampling_steps", "4", "--out", out, *flags, cwd=root))
    npz = next((root / out).glob("*.npz"))
    return npz.name, np.load(npz)["arr_0"]


def test_sampling_autoguided_by_an_earlier_checkpoint_of_the_run(run):
    early = f"checkpoints/{RUN}/ddpm_ts20_epoch0001.pt"
    _, alone = sample(run, out="alone")
    name, guided = sample(run, "--guide", early, "--guidance_scale", "2.5", out="guided")
    assert name == "samples_ddim4_eta0_guide-ddpm_ts20_epoch0001_w2.5_seed0.npz"
    assert not np.array_equal(guided, alone)
    _, by_itself = sample(run, "--guide", f"checkpoints/{RUN}/latest.pt", "--guidance_scale", "2.5", out="itself")
    assert np.array_equal(by_itself, alone)
    # the command a finished run prints: its power EMA 0.05 autoguided by its epoch-1 checkpoint's, w 2
    command = (run / "train.out").read_text().split("sample it: ")[1].splitlines()[0]
    assert command == (f"python train_ddpm.py --mode sample --checkpoint checkpoints/{RUN}/ddpm_ts20_epoch0003.pt "
                       f"--sampler dpmpp2m --sampling_steps 20 --ema_length 0.05 --guide {early} "
                       f"--guide_ema_length 0.05 --guidance_scale 2")
    assert_ok(run_cli(*shlex.split(command)[2:], "--num_samples", "3", "--sampler", "ddim", "--sampling_steps", "4",
                      "--out", "ema", cwd=run))
    assert [p.name for p in (run / "ema").glob("*.npz")] == [
        "samples_ddim4_eta0_guide-ddpm_ts20_epoch0001_ema0.05_w2_ema0.05_seed0.npz"]


def tiny_checkpoint(path, classes=(), **changes):
    cfg = td.Config(**{**td.PRESETS["quick_test"], "base_channels": 16, "channel_mults": (1, 2), "timesteps": 20,
                       "beta_start": 0.005, "beta_end": 0.999, **changes})
    ckpt = dict(model=td.build_model(cfg, len(classes)).state_dict(), config=td.asdict(cfg), step=1, epoch=1)
    torch.save({**ckpt, **({"class_names": list(classes)} if classes else {})}, path)


@pytest.mark.parametrize("changes, fragment", [
    (dict(image_size=16), "image size 16 where the model has 32"),
    (dict(timesteps=40), "schedule T=40 linear, betas 0.005..0.999 where the model has T=20 linear"),
    (dict(schedule_type="cosine"), "schedule T=20 cosine, s 0.008"),
    (dict(classes=("cat", "dog")), "classes cat, dog where the model has none"),
], ids=["image-size", "timesteps", "schedule", "classes"])
def test_a_guide_of_another_task_is_refused_in_one_line_and_nothing_is_written(changes, fragment, tmp_path):
    tiny_checkpoint(tmp_path / "main.pt")
    tiny_checkpoint(tmp_path / "guide.pt", **changes)
    before = snapshot(tmp_path)
    result = run_cli("--mode", "sample", "--checkpoint", "main.pt", "--guide", "guide.pt", "--guidance_scale", "2",
                     "--out", "out", cwd=tmp_path)
    assert_one_line_error(result, "--guide guide.pt does not match the model it would guide", fragment)
    assert snapshot(tmp_path) == before


def test_guidance_flags_that_cannot_apply_are_refused(run):
    for flags, fragment in ((["--guide", f"checkpoints/{RUN}/ddpm_ts20_epoch0001.pt"], "--guide needs --guidance_scale"),
                            (["--guidance_scale", "2"], "or a --guide (autoguidance)"),
                            (["--guide_ema_length", "0.1"], "--guide_ema_length needs --guide")):
        result = run_cli("--mode", "sample", "--checkpoint", f"checkpoints/{RUN}", *flags, cwd=run)
        assert_one_line_error(result, fragment)


def test_previews_and_fid_during_training_are_autoguided_by_the_guide(run, cifar_dir, tmp_path):
    guide = run / "checkpoints" / RUN / "ddpm_ts20_epoch0001.pt"
    fid = (["--fid_every", "3", "--fid_samples", "4", "--fid_weights", FID_WEIGHTS]
           if FID_WEIGHTS.is_file() and importlib.util.find_spec("pytorch_fid") else [])
    previews = {}
    for name, flags in (("alone", []), ("w1", ["--guide", guide, "--guidance_scale", "1"]),
                        ("w3", ["--guide", guide, "--guidance_scale", "3", *fid])):
        (tmp_path / name).mkdir()
        assert_ok(run_cli(*TINY, "--epochs", "3", "--sample_every", "3", "--data_dir", cifar_dir, *flags,
                          cwd=tmp_path / name))
        previews[name] = (tmp_path / name / "samples" / RUN / "epoch_0003.png").read_bytes()
    assert previews["w1"] == previews["alone"] and previews["w3"] != previews["alone"]
    if fid:
        rows = read_loss_log(tmp_path / "w3" / "checkpoints" / RUN / "fid_log.csv")
        assert [(r["source"], r["guidance_scale"]) for r in rows] == [("ema, guided by ddpm_ts20_epoch0001", "3")]
