"""Power-function EMA and its post-hoc reconstruction (EDM2, Karras et al. 2024), against closed forms,
an independently tracked EMA, and the real command line."""

import math
import shutil

import numpy as np
import pytest
import torch

import train_ddpm as td
from test_cli import RUN, TINY, assert_ok, assert_one_line_error, load_ckpt, run_cli
import test_cli

cifar_dir = test_cli.cifar_dir


def sigma_rel_of(gamma):
    """EDM2 Eq. 3: the relative standard deviation of the profile tau^gamma on [0, 1]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def test_the_exponent_of_a_length_is_edm2s_and_gives_that_length_back():
    assert td.power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's own pair of profiles
    assert td.power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.137, 0.25, 0.288):
        assert sigma_rel_of(td.power_ema_exponent(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    assert td.MAX_SIGMA_REL == pytest.approx(sigma_rel_of(0.0))


def sequence(steps, seed=0):
    """Weights after each update: a drifting mean with noise, (steps, 7) float64."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 3, steps, dtype=torch.float64)[:, None] * torch.randn(1, 7, generator=g,
                                                                                     dtype=torch.float64)
    return drift + 0.3 * torch.randn(steps, 7, generator=g, dtype=torch.float64)


def track(weights, sigma_rels, snapshot_at=()):
    """PowerEMA over a parameter set to each row of `weights` in turn: its final profiles, and their
    values (as fp16 snapshot state dicts) after the updates in snapshot_at."""
    model = torch.nn.Linear(7, 1, bias=False).double()
    ema, snapshots = td.PowerEMA(model, sigma_rels), {}
    for step, w in enumerate(weights):
        with torch.no_grad():
            model.weight.copy_(w[None])
        ema.update(model, step)
        if step + 1 in snapshot_at:
            snapshots[step + 1] = ema.state_dict(torch.float16)
    return ema, snapshots


def test_the_power_ema_of_a_sequence_is_its_closed_form_average():
    weights = sequence(300)
    ema, _ = track(weights, (0.05, 0.2))
    tau = torch.arange(1, 301, dtype=torch.float64)
    for model, gamma in zip(ema.models, ema.gammas):
        coefficients = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 300 ** (gamma + 1)
        assert coefficients.sum() == pytest.approx(1.0)
        torch.testing.assert_close(model.weight[0], (coefficients[:, None] * weights).sum(0), rtol=1e-12, atol=1e-12)


def test_profile_inner_products_are_the_integrals_of_the_profiles():
    tau = np.linspace(0, 1000, 2_000_001)[1:]
    profile = lambda t, g: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)  # noqa: E731
    for (t_a, g_a), (t_b, g_b) in [((400, 16.97), (1000, 6.94)), ((1000, 3.0), (700, 9.5)), ((500, 2.0), (500, 2.0))]:
        product = profile(t_a, g_a) * profile(t_b, g_b)
        numeric = ((product[1:] + product[:-1]) / 2 * np.diff(tau)).sum()
        assert td.profile_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)


def test_a_tracked_length_is_its_own_reconstruction():
    basis = [(t, g) for t in (100, 200, 300, 400) for g in (16.97, 6.94)]
    x, error = td.posthoc_coefficients(basis, (400, 6.94))
    np.testing.assert_allclose(x, np.eye(8)[7], atol=1e-6)
    assert error < 1e-6


def write_run(folder, weights, sigma_rels, snapshot_at):
    """A checkpoint dict at the last update, its snapshots written as a run writes them."""
    ema, snapshots = track(weights, sigma_rels, snapshot_at)
    (folder / "ema_snapshots").mkdir(parents=True)
    for step, state in snapshots.items():
        torch.save({"step": step, **state}, folder / "ema_snapshots" / f"ema_step{step:09d}.pt")
    return {"step": len(weights), "ema": {"weight": torch.zeros(1, 7, dtype=torch.float64)},
            "power_ema": ema.state_dict()}


def test_an_untracked_length_rebuilt_from_snapshots_matches_the_ema_tracked_at_that_length(tmp_path):
    weights = sequence(2000)
    ckpt = write_run(tmp_path, weights, (0.05, 0.10), snapshot_at=range(100, 2001, 100))
    for sigma_rel in (0.03, 0.07, 0.15):
        rebuilt = td.posthoc_ema(ckpt, tmp_path, sigma_rel)
        truth = track(weights, (sigma_rel,))[0].models[0].weight
        # What the EMA removes is the noise (0.3); the rebuilt length must keep to the tracked one
        # far closer than that, and far closer than the neighbouring lengths do.
        error = (rebuilt["ema"]["weight"] - truth).norm() / truth.norm()
        assert error < 0.01, (sigma_rel, float(error))
        assert rebuilt["ema_name"] == f"power EMA {sigma_rel:g}"
        assert rebuilt["ema"]["weight"].dtype == torch.float64
    assert ckpt["ema"]["weight"].abs().max() == 0  # the checkpoint read is left as it was


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, cifar_dir):
    root = tmp_path_factory.mktemp("profiled")
    assert_ok(run_cli(*TINY, "--epochs", "3", "--sample_every", "0", "--data_dir", cifar_dir, "--ema_profiles",
                      "0.05,0.12", "--ema_snapshot_every", "32", cwd=root))
    return root


def test_a_run_with_profiles_writes_snapshots_and_rebuilds_a_tracked_profile_as_itself(profiled):
    run = profiled / "checkpoints" / RUN
    assert sorted(p.name for p in (run / "ema_snapshots").iterdir()) == [f"ema_step{s:09d}.pt"
                                                                         for s in (2, 4, 6, 8, 10, 12, 14)]
    ckpt = load_ckpt(run / "latest.pt")
    assert ckpt["step"] == 15 and ckpt["power_ema"]["sigma_rels"] == [0.05, 0.12]
    snapshot = load_ckpt(run / "ema_snapshots" / "ema_step000000010.pt")
    assert snapshot["step"] == 10 and all(v.dtype == torch.float16 for v in snapshot["models"][1].values())
    for k, sigma_rel in enumerate((0.05, 0.12)):
        rebuilt = td.posthoc_ema(ckpt, run, sigma_rel)["ema"]
        for name, value in ckpt["power_ema"]["models"][k].items():
            torch.testing.assert_close(rebuilt[name], value, rtol=1e-4, atol=1e-5)


def test_sampling_at_an_ema_length_names_it_in_the_files_and_says_how_it_was_rebuilt(profiled):
    result = run_cli("--mode", "sample", "--checkpoint", f"checkpoints/{RUN}", "--num_samples", "2",
                     "--ema_length", "0.08", "--sampling_steps", "3", cwd=profiled)
    assert_ok(result)
    assert "power EMA sigma_rel 0.08 at step 15: rebuilt from 7 snapshots" in result.stdout
    assert "power EMA 0.08 weights" in result.stdout
    assert list((profiled / "samples" / RUN).glob("samples_ddpm3_fixedlarge_ema0.08_seed0.npz"))


@pytest.mark.parametrize("flags, message", [
    (["--ema_length", "0.3"], "--ema_length must be in (0, 0.2887)"),
    (["--ema_length", "0.1", "--no_ema"], "--ema_length chooses an EMA and --no_ema the raw weights"),
])
def test_bad_ema_lengths_are_refused_in_one_line(profiled, flags, message):
    result = run_cli("--mode", "sample", "--checkpoint", f"checkpoints/{RUN}", "--num_samples", "2", *flags,
                     cwd=profiled)
    assert_one_line_error(result, message)


def test_an_ema_length_of_a_run_without_profiles_or_with_a_corrupt_snapshot_is_refused(profiled, tmp_path):
    shutil.copytree(profiled / "checkpoints", tmp_path / "checkpoints")
    run = tmp_path / "checkpoints" / RUN
    (run / "ema_snapshots" / "ema_step000000008.pt").write_bytes(b"not a snapshot")
    result = run_cli("--mode", "sample", "--checkpoint", str(run), "--ema_length", "0.1", cwd=tmp_path)
    assert_one_line_error(result, "ema_step000000008.pt is unreadable", "move it away")
    ckpt = load_ckpt(run / "latest.pt")
    del ckpt["power_ema"]
    torch.save(ckpt, run / "plain.pt")
    result = run_cli("--mode", "sample", "--checkpoint", str(run / "plain.pt"), "--ema_length", "0.1", cwd=tmp_path)
    assert_one_line_error(result, "needs a checkpoint of a run trained with --ema_profiles")


@pytest.mark.parametrize("flags, message", [
    (["--ema_profiles", "0.05,0.4", "--ema_snapshot_every", "64"], "--ema_profiles takes distinct lengths"),
    (["--ema_profiles", "0.05,0.05", "--ema_snapshot_every", "64"], "--ema_profiles takes distinct lengths"),
    (["--ema_profiles", "0.05"], "--ema_profiles needs --ema_snapshot_every IMAGES"),
])
def test_bad_profiles_are_refused_before_training(flags, message, tmp_path):
    result = run_cli(*TINY, *flags, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "checkpoints").exists()
