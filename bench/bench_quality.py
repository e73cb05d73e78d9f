"""The quality race: our trainer against diffusers and denoising-diffusion-pytorch on the same images.

    tar -xzf ../shared/data/cifar10-jpeg75.tar.gz -C /tmp
    python bench/bench_quality.py --data_dir /tmp/cifar10-jpeg75/train --images 150000 --num_samples 1000 \
        --fid_weights ../shared/fid/pt_inception-2015-12-05-fc-zeroed.pth \
        --reference_stats ../shared/fid/cifar10-jpeg75-train-stats.npz --real_dir /tmp/cifar10-jpeg75/test

Every contender trains on the images under --data_dir for the same number of training images
(--images, rounded up to whole batches of its own batch size), from the same seed, each the way its
own users train it by default, with a UNet of about the same parameter count:

- ours: `train_ddpm.py --mode train --preset P` (default cpu_hour) run as a subprocess, the real
  command line; and ours with the ddpm_paper recipe at the same UNet (the same architecture flags).
- diffusers: UNet2DModel with our architecture (as --export_diffusers writes it), DDPMScheduler, and
  the recipe of diffusers' examples/unconditional_image_generation/train_unconditional.py with its
  defaults: batch 16, AdamW lr 1e-4 betas (0.95, 0.999) weight decay 1e-6, cosine LR after 500
  warmup steps (to zero at the end of the budget), gradient clip 1.0, EMAModel with warmup
  (inv_gamma 1, power 3/4, max decay 0.9999), fp32, no flips, shuffled batches. That script needs
  the `datasets` package and a hub dataset; this is its loop written out on the decoded images.
- lucidrains: denoising-diffusion-pytorch's own Unet (dim chosen to match the parameter count),
  GaussianDiffusion and Trainer with their defaults (v-prediction, sigmoid schedule, batch 16, Adam
  1e-4, EMA 0.995 every 10 steps, clip 1.0, flips, previews every 1,000 steps), driven on the folder;
  only its FID during training is off (it downloads Inception weights).

Then each samples --num_samples images with DDIM, 50 steps, eta 0, in its own library (ours also with
DPM-Solver++(2M), 20 steps; with --ema_length S also from the power EMA of length S rebuilt after
training, and with --guide_epoch E and --guidance_scales that EMA autoguided by the run's own epoch-E
checkpoint, its EMA of the same length), scored by FID@N and KID against one reference: --reference_stats (KID
then uses the features of --kid_images random training images) or the whole training set. With
--real_dir, N held-out real images are scored the same way: the floor of the measurement.

Prints one Markdown table (also written to OUT/race.md) and writes OUT/race.png with the first 50
images of every row side by side, labelled. A contender whose package is missing is skipped with a
note; a finished contender is not trained again when the script is rerun with the same settings.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_ddpm as td  # noqa: E402

UNET_FIELDS = ("image_size", "base_channels", "channel_mults", "num_res_blocks", "use_attention", "attn_resolutions",
               "emb_dim", "norm_groups", "norm_min_channels", "norm_eps", "downsample_padding")
PEER_BATCH = 16         # train_unconditional.py's --train_batch_size and lucidrains' Trainer default
PEER_TIMESTEPS = 1000   # both peers' defaults
DDIM_STEPS = 50
PICTURE_IMAGES = 50


# --- contenders -----------------------------------------------------------------------------------

def flag_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def race_config(args):
    """The Config of our main contender: --preset with --train_flags, parsed by train_ddpm's own parser."""
    parsed = td.build_parser().parse_args(["--mode", "train", "--preset", args.preset, *args.train_flags.split()])
    return td.preset_config(args.preset, td.explicit_config(parsed))


def run_ours(args, key, preset, flags, out):
    """Train with the real command line for the image budget, then sample with it; returns the result."""
    cfg = td.preset_config(preset, td.explicit_config(td.build_parser().parse_args(["--mode", "train", *flags])))
    steps = math.ceil(args.images / cfg.batch_size)
    common = ["--checkpoint_dir", str(out / "checkpoints"), "--samples_dir", str(out / "previews")]
    train = [sys.executable, str(REPO / "train_ddpm.py"), "--mode", "train", "--preset", preset, *flags,
             "--dataset", "folder", "--data_dir", args.data_dir, "--train_subset", "0", "--val_size", "0",
             "--max_steps", str(steps), "--epochs", "1000000", "--max_minutes", "0", "--fid_every", "0",
             "--run_name", key, "--seed", str(args.seed), *common]
    start = time.perf_counter()
    subprocess.run(train, check=True)
    train_seconds = time.perf_counter() - start
    ckpt = td.read_checkpoint(td.resolve_checkpoint_path(str(out / "checkpoints" / key)))
    params = td.count_parameters(td.build_model(td.config_from_dict(ckpt["config"])))
    rows = []
    for sampler, flags in our_samplings(args, key, out / "checkpoints" / key, cfg.timesteps):
        folder = out / key / variant_slug(sampler)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--mode", "sample", "--checkpoint",
                        str(out / "checkpoints" / key), *flags, "--eta", "0", "--num_samples", str(args.num_samples),
                        "--seed", str(args.seed), "--out", str(folder)], check=True)
        seconds = time.perf_counter() - start
        images = np.load(next(folder.glob("*.npz")))["arr_0"]
        rows.append(sample_row(out, key, sampler, seconds, images))
    return dict(params=params, batch=cfg.batch_size, steps=steps, train_seconds=train_seconds, rows=rows)


def our_samplings(args, key, run, timesteps):
    """(label, train_ddpm.py flags) of each way a run of ours is sampled: DDIM 50 (the peers' sampler)
    and, for the main row, DPM-Solver++(2M) 20; with --ema_length also the power EMA of that length
    rebuilt after training, and with --guide_epoch that EMA autoguided by the run's own checkpoint of
    that epoch (its EMA of the same length) at each --guidance_scales w."""
    ddim, dpm = f"ddim {DDIM_STEPS}", "dpmpp2m 20"
    samplings = [(ddim, ["--sampler", "ddim", "--sampling_steps", str(DDIM_STEPS)])]
    if key == "ours_paper":
        return samplings
    samplings.append((dpm, ["--sampler", "dpmpp2m", "--sampling_steps", "20"]))
    if args.ema_length:
        length, ema = f"{args.ema_length:g}", f"{dpm}, EMA {args.ema_length:g}"
        ema_flags = samplings[-1][1] + ["--ema_length", length]
        samplings.append((ema, ema_flags))
        if args.guide_epoch:
            guide = ["--guide", str(run / f"ddpm_ts{timesteps}_epoch{args.guide_epoch:04d}.pt"),
                     "--guide_ema_length", length]
            samplings += [(f"{ema}, autoguided by epoch {args.guide_epoch}, w {w:g}",
                           ema_flags + guide + ["--guidance_scale", f"{w:g}"]) for w in args.guidance_scales]
    return samplings


def variant_slug(label):
    """A label as a file or folder name: each run of characters other than letters and digits is one '-'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


def sample_row(out, key, sampler, seconds, images):
    """A contender's sampling: its images saved as OUT/<key>/samples_<sampler>.npz; sampler is its label
    in the table, e.g. 'ddim 50'."""
    path = out / key / f"samples_{variant_slug(sampler)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images)
    return dict(sampler=sampler, seconds=seconds, samples=str(path.relative_to(out)))


def shuffled_batches(n, batch, steps, seed):
    """Indices of `steps` batches: a fresh permutation every epoch, whole batches only (a DataLoader
    with shuffle=True, as both peers' scripts use)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = n // batch
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        yield order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]


def run_diffusers(args, cfg, out):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    images = torch.from_numpy(td.load_image_folder(args.data_dir, cfg.image_size, num_workers=os.cpu_count())[0])
    steps = math.ceil(args.images / PEER_BATCH)
    torch.manual_seed(args.seed)
    unet_config, _ = td.diffusers_configs(cfg)
    model = UNet2DModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    noise_scheduler = DDPMScheduler(num_train_timesteps=PEER_TIMESTEPS, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=500, num_training_steps=steps)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    start = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc="diffusers", unit="step") as bar:
        for batch in shuffled_batches(len(images), PEER_BATCH, steps, args.seed):
            clean = images[batch].float() / 127.5 - 1  # ToTensor then Normalize([0.5], [0.5])
            noise = torch.randn_like(clean)
            t = torch.randint(0, PEER_TIMESTEPS, (len(clean),))
            loss = F.mse_loss(model(noise_scheduler.add_noise(clean, noise, t), t).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    train_seconds = time.perf_counter() - start

    ema.copy_to(model.parameters())
    model.eval()
    pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    start, parts = time.perf_counter(), []
    for k, first in enumerate(tqdm(range(0, args.num_samples, args.sample_batch), desc="diffusers sampling")):
        n = min(args.sample_batch, args.num_samples - first)
        generator = torch.Generator().manual_seed(args.seed * 100_003 + k)
        result = pipeline(batch_size=n, generator=generator, num_inference_steps=DDIM_STEPS, eta=0.0, output_type="np")
        parts.append(np.round(result.images * 255).clip(0, 255).astype(np.uint8))
    row = sample_row(out, "diffusers", f"ddim {DDIM_STEPS}", time.perf_counter() - start, np.concatenate(parts))
    return dict(params=td.count_parameters(model), batch=PEER_BATCH, steps=steps, train_seconds=train_seconds,
                rows=[row])


def lucidrains_dim(params):
    """The Unet dim (a multiple of 8, its GroupNorm's group count) whose size is nearest `params`."""
    from denoising_diffusion_pytorch import Unet
    best = None
    for dim in range(8, 257, 8):
        n = td.count_parameters(Unet(dim=dim))
        if best is None or abs(n - params) < abs(best[1] - params):
            best = (dim, n)
        if n > params:
            break
    return best[0]


def run_lucidrains(args, params, out):
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    steps = math.ceil(args.images / PEER_BATCH)
    torch.manual_seed(args.seed)
    model = Unet(dim=lucidrains_dim(params))
    diffusion = GaussianDiffusion(model, image_size=32, timesteps=PEER_TIMESTEPS, sampling_timesteps=DDIM_STEPS)
    (out / "lucidrains").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(diffusion, args.data_dir, train_batch_size=PEER_BATCH, train_num_steps=steps,
                      results_folder=str(out / "lucidrains" / "results"), calculate_fid=False)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    sampler = trainer.ema.ema_model.eval()
    torch.manual_seed(args.seed)
    start, parts = time.perf_counter(), []
    with torch.inference_mode():
        for first in tqdm(range(0, args.num_samples, args.sample_batch), desc="lucidrains sampling"):
            x = sampler.sample(batch_size=min(args.sample_batch, args.num_samples - first))  # DDIM, eta 0, [0, 1]
            parts.append((x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    row = sample_row(out, "lucidrains", f"ddim {DDIM_STEPS}", time.perf_counter() - start, np.concatenate(parts))
    return dict(params=td.count_parameters(model), batch=PEER_BATCH, steps=steps, train_seconds=train_seconds,
                rows=[row])


CONTENDERS = {
    # key: (label, the package it needs)
    "ours": ("ours ({preset})", None),
    "ours_paper": ("ours, ddpm_paper recipe", None),
    "diffusers": ("diffusers (train_unconditional.py)", "diffusers"),
    "lucidrains": ("denoising-diffusion-pytorch", "denoising_diffusion_pytorch"),
}


def run_contender(args, key, cfg, params, out):
    if key == "ours":
        return run_ours(args, key, args.preset, args.train_flags.split(), out)
    if key == "ours_paper":
        unet = [a for f in UNET_FIELDS for a in (f"--{f}", flag_value(getattr(cfg, f)))]
        return run_ours(args, key, "ddpm_paper", unet, out)
    if key == "diffusers":
        return run_diffusers(args, cfg, out)
    return run_lucidrains(args, params, out)


def cached_or_run(args, key, cfg, params, out):
    """The contender's result, from OUT/<key>/result.json when it was made with these settings."""
    settings = dict(images=args.images, num_samples=args.num_samples, seed=args.seed, preset=args.preset,
                    train_flags=args.train_flags, data_dir=str(Path(args.data_dir).resolve()))
    if key == "ours":
        settings["samplings"] = [[label, flags] for label, flags in
                                 our_samplings(args, key, out / "checkpoints" / key, cfg.timesteps)]
    path = out / key / "result.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings and all((out / r["samples"]).is_file() for r in saved["rows"]):
            print(f"{key}: reusing {path}")
            return saved
    print(f"\n=== {key}: training on {args.images:,} images ===", flush=True)
    result = dict(run_contender(args, key, cfg, params, out), settings=settings)
    td.atomic_write_text(json.dumps(result, indent=1), path)
    return result


# --- scoring and the picture --------------------------------------------------------------------

def mean_saturation(images):
    """Max minus min channel per pixel, averaged: 0-255 (real CIFAR-10 is about 32)."""
    return float((images.max(axis=-1).astype(float) - images.min(axis=-1)).mean())


class Scorer:
    """FID and KID of uint8 (N, H, W, 3) images against one reference, the same for every row."""

    def __init__(self, args, out):
        self.device = td.pick_device(args.device)
        self.extractor = td.build_fid_inception(args.fid_weights, self.device)
        if args.reference_stats:
            self.mu, self.sigma = td.load_statistics(args.reference_stats)
            train, _ = td.load_image_folder(args.data_dir, 32, os.cpu_count())
            pick = np.sort(np.random.default_rng(args.seed).choice(len(train), min(args.kid_images, len(train)),
                                                                   replace=False))
            kid_images = train[pick].transpose(0, 2, 3, 1)
            self.kid_features = td.reference_statistics(
                kid_images, self.extractor, out / "fid_stats" / td.reference_cache_name("kid-reference", len(pick)),
                device=self.device).features
            self.name = f"{Path(args.reference_stats).name} (KID: {len(pick):,} training images)"
        else:
            train, _ = td.load_image_folder(args.data_dir, 32, os.cpu_count())
            stats = td.reference_statistics(train.transpose(0, 2, 3, 1), self.extractor,
                                            out / "fid_stats" / td.reference_cache_name("train", len(train)),
                                            device=self.device)
            self.mu, self.sigma, self.kid_features = stats.mu, stats.sigma, stats.features
            self.name = f"the {len(train):,} training images"

    def __call__(self, images):
        activations = td.compute_activations(images, self.extractor, device=self.device)
        fid = td.frechet_distance(*td.activation_statistics(activations), self.mu, self.sigma)
        kid, kid_std = td.kernel_inception_distance(activations, self.kid_features)
        return fid, f"{kid * 1e3:.2f} +- {kid_std * 1e3:.2f}"


def real_images(folder, n, seed):
    images, _ = td.load_image_folder(folder, 32, os.cpu_count())
    # Random order, not sorted: a class-sorted folder would otherwise put only airplanes in the picture.
    pick = np.random.default_rng(seed).choice(len(images), min(n, len(images)), replace=False)
    return images[pick].transpose(0, 2, 3, 1)


def write_picture(panels, path, columns=3):
    """panels: [(label, uint8 (N, H, W, 3))]; the first 50 images of each as a 10 x 5 block under its label."""
    from PIL import Image, ImageDraw
    size, label_height, gap = 32, 16, 8
    width, height = 10 * size, 5 * size + label_height
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, images) in enumerate(panels):
        left, top = (i % columns) * (width + gap), (i // columns) * (height + gap)
        draw.text((left + 2, top + 2), label, fill="black")
        for j, image in enumerate(images[:PICTURE_IMAGES]):
            canvas.paste(Image.fromarray(image), (left + (j % 10) * size, top + label_height + (j // 10) * size))
    canvas.save(path)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def table(rows, n):
    lines = [f"| contender | parameters | training images | wall time | train images/s | sampler | sampling s | "
             f"FID@{n} | KID x1e3 | mean saturation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(" | ".join(["", r["label"], r["params"], r["images"], r["wall"], r["rate"], r["sampler"],
                                 r["sampling"], r["fid"], r["kid"], f"{r['saturation']:.1f}", ""]).strip())
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="image folder to train on (class subfolders are fine)")
    parser.add_argument("--images", type=int, default=150_000, help="training images per contender")
    parser.add_argument("--num_samples", type=int, default=2000, help="N: samples per row for FID@N and KID")
    parser.add_argument("--preset", default="cpu_hour", help="our preset (the first row)")
    parser.add_argument("--train_flags", default="", help="extra train_ddpm.py flags for our first row, e.g. "
                                                          "'--base_channels 16' (its UNet is everyone's size)")
    parser.add_argument("--ema_length", type=float, default=0.0, help="also sample ours with the power EMA of this "
                        "sigma_rel rebuilt after training (the preset must track --ema_profiles)")
    parser.add_argument("--guide_epoch", type=int, default=0, help="with --ema_length: also sample ours autoguided "
                        "by its own checkpoint of this epoch")
    parser.add_argument("--guidance_scales", type=lambda text: [float(w) for w in text.split(",")], default=[2.0],
                        help="autoguidance weights w, comma-separated (with --guide_epoch)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of "
                                                                           + ", ".join(CONTENDERS))
    parser.add_argument("--reference_stats", help=".npz with mu and sigma of the reference (else the training set)")
    parser.add_argument("--kid_images", type=int, default=2000, help="training images KID compares with, "
                                                                     "when --reference_stats is given")
    parser.add_argument("--real_dir", help="held-out real images: a row scoring N of them (the measurement's floor)")
    parser.add_argument("--fid_weights", help="the FID Inception weights file (else pytorch-fid's download)")
    parser.add_argument("--no_fid", action="store_true", help="skip FID and KID (a quick look at the pictures)")
    parser.add_argument("--out", default="bench_quality_out", help="folder for runs, samples, race.md, race.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample_batch", type=int, default=250)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    keys = [k for k in args.contenders.split(",") if k]
    unknown = [k for k in keys if k not in CONTENDERS]
    if unknown:
        raise td.UserError(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    if args.images < 1 or args.num_samples < 2:
        raise td.UserError("--images must be at least 1 and --num_samples at least 2")
    if args.guide_epoch and not args.ema_length:
        raise td.UserError("--guide_epoch needs --ema_length (the guide's power EMA is rebuilt at that length)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = race_config(args)
    params = td.count_parameters(td.build_model(cfg))
    print(f"race: {', '.join(keys)} on {args.data_dir}, {args.images:,} training images each, UNet of "
          f"{params:,} parameters ({args.preset}), N = {args.num_samples:,}", flush=True)

    results, notes = {}, []
    for key in keys:
        package = CONTENDERS[key][1]
        if package and importlib.util.find_spec(package) is None:
            notes.append(f"{key} skipped: pip install -r bench/requirements.txt")
            print(notes[-1], flush=True)
            continue
        results[key] = cached_or_run(args, key, cfg, params, out)

    scorer = None if args.no_fid else Scorer(args, out)
    rows, panels = [], []
    if args.real_dir:
        images = real_images(args.real_dir, args.num_samples, args.seed)
        fid, kid = scorer(images) if scorer else (None, "-")
        rows.append(dict(label=f"real images ({Path(args.real_dir).name}): the floor", params="-", images="-",
                         wall="-", rate="-", sampler="-", sampling="-", fid="-" if fid is None else f"{fid:.2f}",
                         kid=kid, saturation=mean_saturation(images)))
        panels.append(("real images", images))
    for key, result in results.items():
        label = CONTENDERS[key][0].format(preset=args.preset)
        for r in result["rows"]:
            images = np.load(out / r["samples"])["arr_0"]
            fid, kid = scorer(images) if scorer else (None, "-")
            seen = result["batch"] * result["steps"]
            rows.append(dict(label=label, params=f"{result['params'] / 1e6:.2f}M ({result['params'] / params:.2f}x)",
                             images=f"{seen:,} ({result['steps']:,} x {result['batch']})",
                             wall=duration(result["train_seconds"]),
                             rate=f"{seen / result['train_seconds']:.0f}", sampler=r["sampler"],
                             sampling=f"{r['seconds']:.0f}", fid="-" if fid is None else f"{fid:.2f}", kid=kid,
                             saturation=mean_saturation(images)))
            panels.append((f"{key}, {r['sampler']}", images))

    reference = "not scored (--no_fid)" if scorer is None else scorer.name
    text = (f"{args.images:,} training images per contender on {args.data_dir}; N = {args.num_samples:,} samples "
            f"per row, seed {args.seed}; FID reference: {reference}.\n\n{table(rows, args.num_samples)}\n")
    text += "".join(f"\n{note}" for note in notes)
    td.atomic_write_text(text, out / "race.md")
    write_picture(panels, out / "race.png")
    print("\n" + text + f"\nwrote {out / 'race.md'} and {out / 'race.png'}")


if __name__ == "__main__":
    try:
        main()
    except td.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as e:
        print(f"error: {e.cmd[1]} {e.cmd[2]} {e.cmd[3]} failed with exit code {e.returncode} (its output is above)",
              file=sys.stderr)
        sys.exit(1)
