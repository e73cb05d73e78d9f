"""The best sampling settings of a run: FID against the post-hoc EMA length, and against autoguidance.

    tar -xzf ../shared/data/cifar10-jpeg75.tar.gz -C /tmp
    python bench/bench_ema.py --data_dir /tmp/cifar10-jpeg75/train \
        --fid_weights ../shared/fid/pt_inception-2015-12-05-fc-zeroed.pth \
        --reference_stats ../shared/fid/cifar10-jpeg75-train-stats.npz --seeds 0,1 --steps 1600

For each seed, trains `train_ddpm.py --preset P --max_steps S --ema_profiles ... --ema_snapshot_every N`
through the real command line (at equal steps, so a busy machine changes the time, not the result),
then scores its last checkpoint (DPM-Solver++(2M), 20 steps, --num_samples images, FID and KID
against --reference_stats): with its classic --ema_decay EMA, with the power EMA of each
--ema_lengths value rebuilt after training (--ema_length), and, with --guides, autoguided by an
earlier checkpoint of the same run at each --scales w, the main model at the seed's best length.
--sample_flags changes how every row samples (e.g. the 100-step ancestral sampler).
Prints one Markdown table, writes OUT/ema.md and OUT/ema.png (FID against sigma_rel, and against w).
Scores are cached: a rerun with more lengths, guides or scales only does what is missing.
"""

import copy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_hour as bch  # noqa: E402  (train, score)
import bench_quality as bq  # noqa: E402  (Scorer)

td = bq.td


def floats(text):
    return [float(v) for v in text.replace(",", " ").split()]


def arguments():
    parser = bch.train_and_score_arguments(__doc__, 0.0, 2000, "bench_ema_out")
    parser.add_argument("--seeds", default="0,1", help="a run per seed")
    parser.add_argument("--steps", type=int, default=1600, help="training steps of each run (--max_steps)")
    parser.add_argument("--profiles", default="0.05,0.10", help="--ema_profiles of the runs")
    parser.add_argument("--snapshot_every", type=int, default=8192, help="--ema_snapshot_every of the runs (images)")
    parser.add_argument("--ema_lengths", default="0.02,0.03,0.05,0.07,0.10,0.15,0.20",
                        help="sigma_rel values to rebuild and score")
    parser.add_argument("--guides", default="", help="autoguidance: checkpoint names in each run folder, e.g. "
                                                     "ddpm_ts1000_epoch0001.pt; NAME:SIGMA_REL rebuilds the guide's "
                                                     "EMA at that length")
    parser.add_argument("--scales", default="1.5,2,3", help="autoguidance weights w")
    parser.add_argument("--sample_flags", default="",
                        help="train_ddpm.py sampling flags for every row, after the default DPM-Solver++(2M) 20 steps "
                             "(e.g. \"--sampler ddpm --sampling_steps 100 --var_type fixedsmall\"); part of the "
                             "cache names")
    parser.add_argument("--no_classic", dest="classic", action="store_false",
                        help="score only the power EMAs, not the classic --ema_decay one (to compare training "
                             "recipes at their best post-hoc length)")
    return parser.parse_args()


def train_run(args, seed):
    """The seed's run folder, trained for --steps with the EMA profiles."""
    run_args = copy.copy(args)
    run_args.seed = seed
    run_args.train_flags = (f"{args.train_flags} --max_steps {args.steps} --ema_profiles {args.profiles} "
                            f"--ema_snapshot_every {args.snapshot_every}")
    return bch.train(run_args, Path(args.out) / f"seed{seed}")


def guide_flags(run, guide):
    name, _, length = guide.partition(":")
    return ["--guide", str(run / name)] + (["--guide_ema_length", length] if length else [])


def main():
    args = arguments()
    seeds, lengths = [int(s) for s in args.seeds.split(",")], floats(args.ema_lengths)
    guides, scales = [g for g in args.guides.split(",") if g], floats(args.scales)
    runs = {seed: train_run(args, seed) for seed in seeds}
    scorer = bq.Scorer(args, Path(args.out))
    results, best = {}, {}  # (setting, seed) -> score; seed -> best sigma_rel
    sampling, tag = args.sample_flags.split(), bq.variant_slug(args.sample_flags)

    def score(seed_args, out, last, name, flags=()):
        return bch.score(seed_args, out, scorer, last, "_".join(filter(None, (name, tag))), [*flags, *sampling])

    for seed, run in runs.items():
        out, last = Path(args.out) / f"seed{seed}", run / "latest.pt"
        seed_args = copy.copy(args)
        seed_args.seed = seed
        if args.classic:
            ema = td.read_checkpoint(last)["config"]["ema_decay"]
            results[f"EMA decay {ema:g} (classic)", seed] = score(seed_args, out, last, "classic")
        for s in lengths:
            results[f"power EMA {s:g}", seed] = score(seed_args, out, last, f"ema{s:g}", ["--ema_length", str(s)])
        best[seed] = min(lengths, key=lambda s: results[f"power EMA {s:g}", seed]["fid"])
        for guide in guides:
            for w in scales:
                flags = ["--ema_length", str(best[seed]), *guide_flags(run, guide), "--guidance_scale", str(w)]
                results[f"autoguided by {guide}, w {w:g}", seed] = score(
                    seed_args, out, last, bq.variant_slug(f"ema{best[seed]:g} {guide} w{w:g}"), flags)
    settings = list(dict.fromkeys(setting for setting, _ in results))
    header = " | ".join(f"FID@{args.num_samples} seed {s} | KID x1e3 seed {s}" for s in seeds)
    sampler = "DPM-Solver++(2M) 20 steps" + (f" with {args.sample_flags} on top" if sampling else "")
    lines = [f"{args.preset} {args.train_flags} --max_steps {args.steps} --ema_profiles {args.profiles} "
             f"--ema_snapshot_every {args.snapshot_every}: FID@{args.num_samples} and KID of its last checkpoint "
             f"against {scorer.name}, {sampler}; autoguided rows use each seed's best power EMA "
             f"({', '.join(f'seed {s}: {best[s]:g}' for s in seeds)})", "",
             f"| weights | {header} | mean FID |", "|---|" + "---|---|" * len(seeds) + "---|"]
    for setting in settings:
        row = [results.get((setting, s)) for s in seeds]
        cells = " | ".join(f"{r['fid']:.2f} | {r['kid']}" for r in row)
        lines.append(f"| {setting} | {cells} | {np.mean([r['fid'] for r in row]):.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    Path(args.out, "ema.md").write_text(text + "\n")
    write_plot(results, seeds, lengths, guides, scales, Path(args.out) / "ema.png", args.num_samples)
    print(f"\nwrote {Path(args.out) / 'ema.md'} and {Path(args.out) / 'ema.png'}")


def write_plot(results, seeds, lengths, guides, scales, path, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if guides else 1, figsize=(9 if guides else 5, 3.2), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for k, seed in enumerate(seeds):
        ax.plot(lengths, [results[f"power EMA {s:g}", seed]["fid"] for s in lengths], "o-", color=f"C{k}",
                label=f"seed {seed}")
        classic = next((v for (setting, s), v in results.items() if s == seed and setting.endswith("(classic)")), None)
        if classic:
            ax.axhline(classic["fid"], color=f"C{k}", ls="--", label=f"seed {seed}, classic EMA")
    ax.set_xlabel("post-hoc EMA length sigma_rel")
    ax.set_ylabel(f"FID@{n}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if guides:
        ax = axes[0, 1]
        for k, (guide, seed) in enumerate((g, s) for g in guides for s in seeds):
            ax.plot(scales, [results[f"autoguided by {guide}, w {w:g}", seed]["fid"] for w in scales], "o-",
                    color=f"C{k}", label=f"{guide}, seed {seed}")
        ax.set_xlabel("autoguidance w")
        ax.set_ylabel(f"FID@{n}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
