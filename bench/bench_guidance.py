"""FID of a class-conditional model against the guidance scale w: train once, sample every w, score.

    tar -xzf ../shared/data/cifar10-jpeg75.tar.gz -C /tmp
    python bench/bench_guidance.py --data_dir /tmp/cifar10-jpeg75/train --minutes 30 \
        --fid_weights ../shared/fid/pt_inception-2015-12-05-fc-zeroed.pth \
        --reference_stats ../shared/fid/cifar10-jpeg75-train-stats.npz

Trains `train_ddpm.py --preset P --class_conditional true --class_dropout 0.1 --max_minutes M`
through the real command line (default preset: cpu_hour, the budget one CPU can afford; cifar10_cond
is the full-size recipe), then for each --scales w draws --num_samples class-balanced samples
(`--class_label all --guidance_scale w`, DPM-Solver++(2M) 20 steps, EMA weights, one seed for
every w) and scores FID@N and KID against --reference_stats, with the mean saturation. w = 0 is the
unconditional model, w = 1 plain conditional sampling. Prints one Markdown table and writes
OUT/guidance.md and OUT/classes.png: the class grids (a row per class) of every w side by side.
Finished steps are cached: a rerun with the same settings only does what is missing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_hour as ch  # noqa: E402  (training through the CLI, cached scoring)
import bench_quality as bq  # noqa: E402

td = bq.td


def side_by_side(paths, path, gap=8):
    from PIL import Image
    grids = [Image.open(p).convert("RGB") for p in paths]
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, max(g.height for g in grids)), "white")
    x = 0
    for g in grids:
        canvas.paste(g, (x, 0))
        x += g.width + gap
    canvas.save(path)


def main():
    parser = ch.train_and_score_arguments(__doc__, 30.0, 1000, "bench_guidance_out")
    parser.add_argument("--scales", default="0,1,2,3", help="guidance scales w, comma-separated")
    args = parser.parse_args()
    scales = [float(w) for w in args.scales.split(",")]
    args.train_flags = f"--class_conditional true --class_dropout 0.1 {args.train_flags}"
    out = Path(args.out)
    run = ch.train(args, out)
    checkpoint = td.find_latest_checkpoint(run)
    ckpt = td.read_checkpoint(checkpoint)
    scorer = bq.Scorer(args, out)
    rows = []
    for w in scales:
        name = f"w{w:g}"
        rows.append(dict(w=w, **ch.score(args, out, scorer, checkpoint, name,
                                         ["--class_label", "all", "--guidance_scale", f"{w:g}"])))
    minutes, step = ckpt["elapsed_s"] / 60, ckpt["step"]
    lines = [f"{args.preset} with class labels (class dropout 0.1): {minutes:.0f} minutes, {step:,} steps of "
             f"{ckpt['config']['batch_size']} on {args.data_dir}; {args.num_samples:,} class-balanced samples per w "
             f"(DPM-Solver++(2M) 20 steps, EMA weights, seed {args.seed}); FID and KID against {scorer.name}", "",
             f"| guidance scale w | FID@{args.num_samples} | KID x1e3 | mean saturation |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['w']:g} | {r['fid']:.2f} | {r['kid']} | {r['saturation']:.1f} |")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "guidance.md").write_text(text + "\n")
    grids = [next((out / "samples" / f"w{w:g}").glob("*_grid.png")) for w in scales]
    side_by_side(grids, out / "classes.png")
    print(f"\nwrote {out / 'guidance.md'} and {out / 'classes.png'}")


if __name__ == "__main__":
    main()
