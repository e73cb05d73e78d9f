"""FID over training time of one preset (default cpu_hour): train for --minutes, score every ~10 minutes.

    tar -xzf ../shared/data/cifar10-jpeg75.tar.gz -C /tmp
    python bench/bench_cpu_hour.py --data_dir /tmp/cifar10-jpeg75/train --real_dir /tmp/cifar10-jpeg75/test \
        --fid_weights ../shared/fid/pt_inception-2015-12-05-fc-zeroed.pth \
        --reference_stats ../shared/fid/cifar10-jpeg75-train-stats.npz

Trains `train_ddpm.py --preset P --max_minutes M` through the real command line (one epoch
checkpoint per pass over the images), then for the epoch checkpoint nearest each --every minutes of
training time samples --num_samples images (DPM-Solver++(2M), 20 steps, EMA weights, the run's
--clip_x0) and scores FID@N and KID against --reference_stats, with the samples' mean saturation
(real CIFAR-10: about 33). Prints one Markdown table, writes OUT/curve.md, OUT/curve.png (FID
against minutes) and OUT/grid.png (the first 100 samples of the last checkpoint, 10 x 10).
Finished steps are cached: a rerun with the same settings only does what is missing.

--sample_flags "A;B" scores each checkpoint sampled each way (extra --mode sample flags, an empty
variant meaning the run's own settings): a column group per variant, a curve each, and
OUT/grid_<variant>.png for every variant after the first.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (its Scorer, saturation and the train_ddpm import)

td, REPO = bq.td, bq.REPO


def train(args, out):
    run = out / "checkpoints" / "run"
    if td.find_latest_checkpoint(run) is not None:
        print(f"{run} is trained already: scoring it")
        return run
    flags = [*args.train_flags.split(), "--dataset", "folder", "--data_dir", args.data_dir, "--train_subset", "0",
             "--val_size", "0", "--max_minutes", str(args.minutes), "--epochs", "100000", "--keep_last", "0",
             "--fid_every", "0", "--run_name", "run", "--seed", str(args.seed),
             "--checkpoint_dir", str(out / "checkpoints"), "--samples_dir", str(out / "previews")]
    subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--mode", "train", "--preset", args.preset, *flags],
                   check=True)
    return run


def checkpoints_to_score(run, every_minutes):
    """(path, minutes, step) of the epoch checkpoint nearest each multiple of every_minutes, and the last."""
    found = []
    for path in td.epoch_checkpoints(run):
        ckpt = td.read_checkpoint(path)
        found.append((path, ckpt["elapsed_s"] / 60, ckpt["step"], ckpt["config"]["batch_size"]))
    marks = np.arange(every_minutes, found[-1][1] + every_minutes / 2, every_minutes)
    chosen = {min(found, key=lambda f: abs(f[1] - m))[0] for m in marks} | {found[-1][0]}
    return [f for f in found if f[0] in chosen]


def score(args, out, scorer, path, name=None, sample_flags=()):
    """FID, KID and saturation of --num_samples samples of checkpoint `path`, cached under `name`."""
    name = name or path.stem
    cache = out / "scores" / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    folder = out / "samples" / name
    subprocess.run([sys.executable, str(REPO / "train_ddpm.py"), "--mode", "sample", "--checkpoint", str(path),
                    "--sampler", "dpmpp2m", "--sampling_steps", "20", "--num_samples", str(args.num_samples),
                    "--seed", str(args.seed), "--out", str(folder), *sample_flags], check=True)
    images = np.load(next(folder.glob("*.npz")))["arr_0"]
    fid, kid = scorer(images)
    result = dict(fid=fid, kid=kid, saturation=bq.mean_saturation(images), samples=str(next(folder.glob("*.npz"))))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def high_frequency_share(images):
    """Per image: the mean square of what a 3x3 box blur removes, over the image's variance, on uint8
    (N, H, W, 3) read as [-1, 1]. Relative to the image's own contrast, so that a rule that only
    lowers contrast (as dynamic thresholding also does) does not count as less texture."""
    x = images.astype(np.float32) / 127.5 - 1
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    blur = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    variance = x.reshape(len(x), -1).var(axis=1)
    return ((x - blur) ** 2).mean(axis=(1, 2, 3)) / np.maximum(variance, 1e-6)


def speckled_percent(share, real_share):
    """Share of images with more high-frequency texture (high_frequency_share) than 99% of the real
    ones: the speckled tiles that young models make, counted instead of eyeballed."""
    return 100 * float((share > np.percentile(real_share, 99)).mean())


def score_real(args, out, scorer):
    """The floor of the measurement: --num_samples held-out real images scored like the samples."""
    cache = out / "scores" / f"real_{args.num_samples}_seed{args.seed}.json"
    if not cache.exists():
        images = bq.real_images(args.real_dir, args.num_samples, args.seed)
        fid, kid = scorer(images)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(dict(fid=fid, kid=kid, saturation=bq.mean_saturation(images))))
    return json.loads(cache.read_text())


def variant_label(flags, run_clip):
    return flags.strip() or f"the run's --clip_x0 {run_clip}"


def write_plot(rows, variants, run_clip, path, n, floor=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for v in variants:
        ax.plot([r["minutes"] for r in rows], [r[v]["fid"] for r in rows], "o-",
                label="samples" if len(variants) == 1 else variant_label(v, run_clip))
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label=f"real images: {floor:.1f}")
    if floor is not None or len(variants) > 1:
        ax.legend()
    ax.set_xlabel("training minutes")
    ax.set_ylabel(f"FID@{n}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_grid(images, path):
    from PIL import Image
    grid = images[:100].reshape(10, 10, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(320, 320, 3)
    Image.fromarray(grid).resize((640, 640), Image.NEAREST).save(path)


def train_and_score_arguments(doc, minutes, num_samples, out):
    """The flags of a benchmark that trains one run through train() and scores it with score()."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="the training images (a folder, e.g. CIFAR-10 as JPEGs)")
    parser.add_argument("--preset", default="cpu_hour")
    parser.add_argument("--train_flags", default="", help="extra train_ddpm.py flags")
    parser.add_argument("--minutes", type=float, default=minutes, help="training time (--max_minutes)")
    parser.add_argument("--num_samples", type=int, default=num_samples)
    parser.add_argument("--reference_stats", help="FID statistics (.npz with mu, sigma) of the training set")
    parser.add_argument("--kid_images", type=int, default=2000)
    parser.add_argument("--fid_weights", help="the FID Inception weights file (else pytorch-fid's download)")
    parser.add_argument("--out", default=out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    return parser


def cells(result, real_share):
    """A scored sample set's FID, KID, saturation and, when real images are given, speckled share."""
    text = f"{result['fid']:.2f} | {result['kid']} | {result['saturation']:.1f}"
    if real_share is not None:
        share = result["share"] if "share" in result else high_frequency_share(np.load(result["samples"])["arr_0"])
        text += f" | {speckled_percent(share, real_share):.1f}"
    return text


def curve_table(args, scorer_name, rows, variants, run_clip, floor, real_share):
    """The Markdown table: a row per scored checkpoint (and the floor), a column group per variant."""
    n = args.num_samples
    measures = "KID x1e3 | mean saturation" + (" | speckled %" if real_share is not None else "")
    groups = [f"FID@{n}" + (f" ({variant_label(v, run_clip)})" if len(variants) > 1 else "") + f" | {measures}"
              for v in variants]
    title = (f"{args.preset}: {args.minutes:g} minutes of training on {args.data_dir}; FID@{n} and KID against "
             f"{scorer_name}; DPM-Solver++(2M) 20 steps unless a variant says otherwise, EMA weights, seed {args.seed}")
    if real_share is not None:
        title += ("; speckled: samples with more high-frequency texture (relative to their contrast) than 99% of "
                  "the real images")
    width = measures.count("|") + 2
    lines = [title, "", f"| training minutes | step | training images | {' | '.join(groups)} |",
             "|---|---|---|" + "---|" * width * len(variants)]
    if floor:
        real = cells(dict(floor, share=real_share), real_share)
        lines.append(f"| real images (held out): the floor | - | - | {real} |" + " |" * width * (len(variants) - 1))
    for r in rows:
        scored = " | ".join(cells(r[v], real_share) for v in variants)
        lines.append(f"| {r['minutes']:.1f} | {r['step']:,} | {r['images']:,} | {scored} |")
    return "\n".join(lines)


def main():
    parser = train_and_score_arguments(__doc__, 60.0, 2000, "bench_cpu_hour_out")
    parser.add_argument("--every", type=float, default=10.0, help="score the checkpoint nearest every this many minutes")
    parser.add_argument("--real_dir", help="held-out real images (e.g. the test folder): adds the floor row and the "
                                           "speckled share")
    parser.add_argument("--sample_flags", default="",
                        help='extra --mode sample flags, e.g. "--clip_x0 dynamic"; variants separated by ";" are '
                             "scored side by side (an empty one: the run's own settings)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.sample_flags.split(";")]
    out = Path(args.out)
    run = train(args, out)
    scorer = bq.Scorer(args, out)
    rows = []
    for path, minutes, step, batch in checkpoints_to_score(run, args.every):
        scores = {v: score(args, out, scorer, path, "_".join(filter(None, (path.stem, bq.variant_slug(v)))), v.split())
                  for v in variants}
        rows.append(dict(path=path, minutes=minutes, step=step, images=step * batch, **scores))
    run_clip = td.config_from_dict(td.read_checkpoint(rows[-1]["path"])["config"]).clip_x0
    floor = score_real(args, out, scorer) if args.real_dir else None
    real_share = high_frequency_share(bq.real_images(args.real_dir, args.num_samples, args.seed)) if floor else None
    text = curve_table(args, scorer.name, rows, variants, run_clip, floor, real_share)
    print("\n" + text)
    (out / "curve.md").write_text(text + "\n")
    write_plot(rows, variants, run_clip, out / "curve.png", args.num_samples, floor and floor["fid"])
    grids = [out / "grid.png"] + [out / f"grid_{bq.variant_slug(v) or 'run'}.png" for v in variants[1:]]
    for v, grid in zip(variants, grids):
        write_grid(np.load(rows[-1][v]["samples"])["arr_0"], grid)
    print(f"\nwrote {out / 'curve.md'}, {out / 'curve.png'} and {', '.join(map(str, grids))}")


if __name__ == "__main__":
    main()
