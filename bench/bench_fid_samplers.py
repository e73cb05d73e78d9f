"""FID against sampling steps for the ddpm, ddim and dpmpp2m samplers of one checkpoint.

    python bench/bench_fid_samplers.py --checkpoint checkpoints/cifar10_ts1000 --num_samples 10000
    python bench/bench_fid_samplers.py --checkpoint RUN --num_samples 500 --fid_weights W.pth \
        --reference_stats ../shared/fid/cifar10-jpeg75-train-stats.npz

Every configuration starts from the same seed and is scored against the same reference: the
checkpoint's training set (statistics cached as in --mode eval), or precomputed mu/sigma given by
--reference_stats (then KID, which needs the reference features, is not reported). --amp bf16,off
repeats every row in each precision of the UNet, --clip_x0 static,dynamic with each rule for the
predicted x_0 (default: the checkpoint's). Prints one Markdown table: FID@N, KID, the samples'
mean saturation (max minus min channel per pixel, 0-255; real CIFAR-10 is about 32), and the time
spent sampling.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ddpm as td  # noqa: E402

DEFAULT_GRID = "ddpm:100,1000;ddim:10,20,50,100;dpmpp2m:10,20,50"


def parse_grid(text, timesteps):
    """'ddpm:100,1000;ddim:10,20' -> [('ddpm', 100), ...], dropping step counts above T."""
    grid = []
    for part in text.split(";"):
        sampler, steps = part.split(":")
        grid += [(sampler, int(k)) for k in steps.split(",") if int(k) <= timesteps]
    return grid


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num_samples", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"sampler:steps,...;... (default {DEFAULT_GRID})")
    parser.add_argument("--fid_weights", default=None)
    parser.add_argument("--reference_stats", default=None, help=".npz with mu and sigma of the reference set")
    parser.add_argument("--data_dir", default=None, help="override the checkpoint's data_dir for the reference")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", default="auto", help="comma-separated --amp values to sample with, e.g. bf16,off")
    parser.add_argument("--clip_x0", default=None,
                        help="comma-separated rules for the predicted x_0, e.g. static,dynamic (default: the checkpoint's)")
    args = parser.parse_args()

    device = td.pick_device(args.device)
    path = td.resolve_checkpoint_path(args.checkpoint)
    ckpt = td.read_checkpoint(path)
    step, cfg = ckpt["step"], td.config_from_dict(ckpt["config"])
    clips = (args.clip_x0 or cfg.clip_x0).split(",")
    if not set(clips) <= set(td.CLIP_MODES):
        raise td.UserError(f"--clip_x0 takes {', '.join(td.CLIP_MODES)}, got {args.clip_x0}")
    extractor = td.build_fid_inception(args.fid_weights, device)
    if args.reference_stats:
        mu, sigma = td.load_statistics(args.reference_stats)
        reference_name, reference = Path(args.reference_stats).name, None
    else:
        images, reference_name = td.reference_images(cfg, args.data_dir or cfg.data_dir)
        cache = path.parent.parent / "fid_stats" / td.reference_cache_name(reference_name, len(images))
        reference = td.reference_statistics(images, extractor, cache, device=device)
        mu, sigma = reference.mu, reference.sigma

    rows = []
    for amp in args.amp.split(","):
        model, diffusion, _ = td.model_from_checkpoint(ckpt, device=device, amp=amp)
        for clip in clips:
            rows += score_grid(args, model, diffusion, cfg, extractor, device, mu, sigma, reference, clip)

    print(f"\n{path} (step {step:,}, T={cfg.timesteps}), N={args.num_samples:,} samples per row, "
          f"reference {reference_name}, device {device}\n")
    print(f"| sampler | steps | precision | clip x0 | FID@{args.num_samples} | KID x1e3 | mean saturation | sampling s "
          f"| images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sampler, steps, precision, clip, fid, kid, saturation, seconds in rows:
        print(f"| {sampler} | {steps} | {precision} | {clip} | {fid:.2f} | {kid} | {saturation:.1f} | {seconds:.1f} | "
              f"{args.num_samples / seconds:.1f} |")


def score_grid(args, model, diffusion, cfg, extractor, device, mu, sigma, reference, clip):
    rows = []
    for sampler, steps in parse_grid(args.grid, cfg.timesteps):
        start = time.perf_counter()
        samples = td.generate_samples(model, diffusion, td.SamplingSpec(sampler, steps, clip_x0=clip),
                                      (args.num_samples, 3, cfg.image_size, cfg.image_size), args.seed, args.batch_size)
        seconds = time.perf_counter() - start
        activations = td.compute_activations(samples, extractor, device=device)
        fid = td.frechet_distance(*td.activation_statistics(activations), mu, sigma)
        kid = "-"
        if reference is not None:
            kid_mean, kid_std = td.kernel_inception_distance(activations, reference.features)
            kid = f"{kid_mean * 1e3:.2f} +- {kid_std * 1e3:.2f}"
        saturation = (samples.max(axis=-1).astype(float) - samples.min(axis=-1)).mean()
        rows.append((sampler, steps, td.precision_name(model.dtype), clip, fid, kid, saturation, seconds))
    return rows


if __name__ == "__main__":
    try:
        main()
    except td.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
