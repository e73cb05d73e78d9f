"""Class-conditional training from a folder of class subfolders, through the real command line:
labels, label dropout, exact resume, guided sampling by class, and the one-line refusals."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_ddpm as td
from test_cli import (assert_ok, assert_one_line_error, load_ckpt, read_loss_log, run_cli, snapshot)

CLASSES = ("cat", "dog", "frog")
TINY = ["--preset", "quick_test", "--dataset", "folder", "--image_size", "8", "--base_channels", "16",
        "--channel_mults", "1,2", "--timesteps", "20", "--beta_start", "0.005", "--beta_end", "0.999",
        "--batch_size", "12", "--val_size", "0", "--train_subset", "0", "--num_preview", "2", "--preview_steps", "3",
        "--log_every", "2", "--warmup_steps", "2", "--num_workers", "1"]


def write_images(root, nested, per_class=16):
    """per_class 8x8 images of each class, tinted by class: in root/<class>/i.png, or flat as root/<class>_i.png."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            image = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
            image[..., c] += 180
            path = root / name / f"{i}.png" if nested else root / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    return root


def losses(run_dir):
    """The loss log without its clocks: what the weights did, step by step."""
    keep = ("step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm", "bad_steps")
    return [{k: row[k] for k in keep} for row in read_loss_log(run_dir / "loss_log.csv")]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    data = write_images(root / "data", nested=True)
    args = [*TINY, "--data_dir", data, "--class_conditional", "--class_dropout", "0.3", "--guidance_scale", "2"]
    assert_ok(run_cli(*args, "--epochs", "2", "--run_name", "whole", cwd=root))
    assert_ok(run_cli(*args, "--epochs", "1", "--run_name", "split", cwd=root))
    assert_ok(run_cli(*args, "--epochs", "2", "--run_name", "split", "--resume", "latest", cwd=root))
    return root


def test_a_conditional_run_stores_its_classes_previews_a_row_each_and_resumes_bit_for_bit(conditional_run):
    whole, split = (load_ckpt(conditional_run / "checkpoints" / run / "latest.pt") for run in ("whole", "split"))
    assert whole["class_names"] == list(CLASSES) and whole["config"]["class_conditional"]
    assert whole["model"]["class_emb.weight"].shape == (len(CLASSES) + 1, 128)
    for key in ("model", "ema"):
        assert all(torch.equal(whole[key][k], split[key][k]) for k in whole[key]), key
    assert losses(conditional_run / "checkpoints" / "whole") == losses(conditional_run / "checkpoints" / "split")
    # the preview: 2 images of each class, a row per class, with room for the names and the title
    preview = Image.open(conditional_run / "samples" / "whole" / "epoch_0002.png")
    margin = 6 * max(map(len, CLASSES)) + 8
    assert preview.size == (margin + 2 * 10, 14 + len(CLASSES) * 10)


def test_sampling_by_class_and_guidance_scale(conditional_run):
    run = conditional_run / "checkpoints" / "whole"

    def sample(*flags, out):
        assert_ok(run_cli("--mode", "sample", "--checkpoint", run, "--sampler", "ddim", "--sampling_steps", "4",
                          "--num_samples", "6", "--seed", "3", "--out", out, *flags, cwd=conditional_run))
        folder = conditional_run / out
        labels = next(folder.glob("*_labels.npy"))
        return np.load(next(folder.glob("*.npz")))["arr_0"], np.load(labels), folder

    images, labels, folder = sample(out="all")  # the default: every class, the run's w = 2
    assert images.shape == (6, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert next(folder.glob("*_all_w2_seed3_grid.png")).is_file()
    assert np.array_equal(images[2:4], sample("--class_label", "1", out="dog_by_index")[0][2:4])
    dog, dog_labels, folder = sample("--class_label", "dog", "--guidance_scale", "1", "--trajectory", out="dog")
    assert dog_labels.tolist() == [1] * 6
    # the trajectory: 4 samples, x_t over x0^ at each of the 4 DDIM calls, then the finished image
    trajectory = np.asarray(Image.open(next(folder.glob("*_trajectory.png"))).convert("RGB")).astype(int)
    assert trajectory.shape == (14 + 2 * 4 * 10, 30 + 5 * 10, 3)
    tile = lambda row, col: trajectory[14 + row * 10:14 + row * 10 + 8, 30 + col * 10:30 + col * 10 + 8]  # noqa: E731
    assert np.array_equal(tile(0, 4), tile(1, 4))  # the last column shows the image itself twice
    assert not np.array_equal(tile(0, 0), tile(0, 4))  # and the first, noise
    # w = 0 is the unconditional model: which class was asked for no longer matters
    cat0, _, folder = sample("--class_label", "cat", "--guidance_scale", "0", "--nearest", "3", out="cat0")
    nearest = Image.open(next(folder.glob("*_nearest.png")))
    assert nearest.size == (4 * 10 + 6, 14 + 6 * 10)  # 6 samples (of at most 10), each + its 3 nearest
    frog0, _, _ = sample("--class_label", "frog", "--guidance_scale", "0", out="frog0")
    assert np.array_equal(cat0, frog0) and not np.array_equal(cat0, dog)


@pytest.mark.parametrize("label, scale, n, fragments", [
    ("horse", None, 6, ["horse", "cat, dog, frog"]),
    ("3", None, 6, ["--class_label 3", "0..2"]),
    ("0", -1.0, 6, ["--guidance_scale"]),
], ids=["unknown-name", "index-out-of-range", "negative-scale"])
def test_bad_class_flags_are_refused_before_any_work(label, scale, n, fragments):
    ckpt = dict(class_names=list(CLASSES))
    args = td.argparse.Namespace(class_label=label, guidance_scale=scale)
    with pytest.raises(td.UserError) as refused:
        td.sampling_classes(args, ckpt, td.Config(), n)
    assert all(fragment in str(refused.value) for fragment in fragments), refused.value


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 64])
def test_all_classes_are_drawn_in_class_order_as_equally_as_the_number_allows(n):
    args = td.argparse.Namespace(class_label=None, guidance_scale=None)
    labels, _ = td.sampling_classes(args, dict(class_names=list(CLASSES)), td.Config(), n)
    assert len(labels) == n and labels.tolist() == sorted(labels.tolist())
    counts = [labels.tolist().count(c) for c in range(len(CLASSES))]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True), counts


def test_sampling_a_number_of_images_that_is_not_a_multiple_of_the_classes_gives_that_number(conditional_run):
    for n, held, want in ((4, "cat x2, dog x1, frog x1", [0, 0, 1, 2]), (2, "cat x1, dog x1", [0, 1])):
        result = run_cli("--mode", "sample", "--checkpoint", conditional_run / "checkpoints" / "whole", "--sampler",
                         "ddim", "--sampling_steps", "3", "--num_samples", n, "--trajectory", "--out", f"n{n}",
                         cwd=conditional_run)
        assert_ok(result)
        assert held in result.stdout, result.stdout
        folder = next(p for p in (conditional_run / f"n{n}").iterdir() if p.is_dir())
        assert len(list(folder.glob("*.png"))) == n
        labels = np.load(next((conditional_run / f"n{n}").glob("*_labels.npy")))
        assert labels.tolist() == want
        grid = Image.open(next((conditional_run / f"n{n}").glob("*_grid.png")))
        assert grid.size[1] == 14 + len(set(labels.tolist())) * 10  # a row per class drawn


def test_the_command_line_refuses_an_unknown_class_in_one_line_and_writes_nothing(conditional_run):
    before = snapshot(conditional_run)
    result = run_cli("--mode", "sample", "--checkpoint", conditional_run / "checkpoints" / "whole",
                     "--class_label", "horse", "--out", "refused", cwd=conditional_run)
    assert_one_line_error(result, "horse", "cat, dog, frog")
    assert snapshot(conditional_run) == before


def test_class_flags_on_an_unconditional_checkpoint_are_refused(tmp_path):
    cfg = td.Config(**{**td.PRESETS["quick_test"], "base_channels": 16, "channel_mults": (1, 2), "timesteps": 20})
    torch.save(dict(model=td.build_model(cfg).state_dict(), config=td.asdict(cfg), step=1, epoch=1), tmp_path / "u.pt")
    for flags in (["--class_label", "0"], ["--guidance_scale", "2"]):
        result = run_cli("--mode", "sample", "--checkpoint", "u.pt", *flags, cwd=tmp_path)
        assert_one_line_error(result, "class-conditional", "unconditional")
    result = run_cli("--mode", "sample", "--checkpoint", "u.pt", "--num_samples", "2", "--sampling_steps", "2",
                     "--out", "fine", cwd=tmp_path)
    assert_ok(result)  # w = 1 (the default) without labels is plain unconditional sampling


def test_labels_change_nothing_unless_asked_for_and_folders_without_classes_are_refused(tmp_path):
    nested, flat = write_images(tmp_path / "nested", True), write_images(tmp_path / "flat", False)
    for name, data in (("nested", nested), ("flat", flat)):
        assert_ok(run_cli(*TINY, "--data_dir", data, "--epochs", "1", "--run_name", name, cwd=tmp_path))
    a, b = (load_ckpt(tmp_path / "checkpoints" / name / "latest.pt") for name in ("nested", "flat"))
    assert "class_names" not in a and not any("class_emb" in k for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert losses(tmp_path / "checkpoints" / "nested") == losses(tmp_path / "checkpoints" / "flat")
    before = snapshot(tmp_path)
    result = run_cli(*TINY, "--data_dir", flat, "--class_conditional", "--run_name", "refused", cwd=tmp_path)
    assert_one_line_error(result, "class subfolder", "cat_0.png")
    assert snapshot(tmp_path) == before
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "cat" / f"{i}.png")
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(*TINY, "--data_dir", one, "--class_conditional", "--run_name", "refused",
                                  cwd=tmp_path), "at least 2 class subfolders")
    assert snapshot(tmp_path) == before
    assert json.loads((tmp_path / "checkpoints" / "flat" / "config.json").read_text())["class_conditional"] is False


def test_nearest_neighbours_of_training_images_are_themselves_at_distance_zero():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 8, 8, 3)).astype(np.uint8)
    queries = np.concatenate([train[[3, 17]], rng.integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)])
    indices, distances = td.nearest_neighbours(queries, train, 4, td.pixel_features, batch_size=7)
    assert indices[:2, 0].tolist() == [3, 17] and (distances[:2, 0] < 1e-6).all()
    # the running top k over batches of 7 is the top k over all 50 at once
    full = torch.cdist(torch.from_numpy(td.pixel_features(queries)).double(),
                       torch.from_numpy(td.pixel_features(train)).double())
    want_d, want_i = full.topk(4, dim=1, largest=False)
    assert np.array_equal(indices, want_i.numpy()) and np.allclose(distances, want_d.numpy(), atol=1e-6)
    assert (np.diff(distances, axis=1) >= 0).all()


FID_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "fid" / "pt_inception-2015-12-05-fc-zeroed.pth"


@pytest.mark.skipif(not FID_WEIGHTS.is_file() or importlib.util.find_spec("pytorch_fid") is None,
                    reason="needs pytorch-fid and ../shared/fid weights")
def test_eval_scores_class_balanced_samples_and_logs_the_guidance_scale(conditional_run):
    run = conditional_run / "checkpoints" / "whole"
    result = run_cli("--mode", "eval", "--checkpoint", run, "--num_samples", "6", "--sampler", "ddim",
                     "--sampling_steps", "3", "--guidance_scale", "3", "--fid_weights", FID_WEIGHTS,
                     "--data_dir", conditional_run / "data", cwd=conditional_run)
    assert_ok(result)
    row = read_loss_log(run / "fid_log.csv")[-1]
    assert (row["classes"], row["guidance_scale"], row["num_samples"]) == ("all", "3", "6")
    assert float(row["fid"]) > 0
