"""Plot the loss log of a train_ddpm.py run and say whether the loss has plateaued.

    python plot_loss.py                                   # newest run under checkpoints/
    python plot_loss.py checkpoints/quick_test_ts100      # a run folder
    python plot_loss.py path/to/loss_log.csv --out loss.png --smooth 50
    python plot_loss.py checkpoints/quick_test_ts100 --progress   # also insist on the preview GIF

The figure shows the raw and smoothed loss on a log axis, the learning rate on a second axis,
and marks epoch boundaries, resume points and warm restarts of the learning rate; below, the loss
by timestep quartile, the validation loss and FID, and the denoising PSNR at four noise levels,
each with a plateau verdict. It also warns when the logged LR spent a fifth of the run at its floor. When the run
has preview grids (samples/<run>/epoch_*.png), progress.gif beside the plot shows them epoch by
epoch, each frame labelled with its epoch.
"""

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: the plot goes to a PNG
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REQUIRED_COLUMNS = ("step", "epoch", "loss", "lr")


class PlotError(Exception):
    """A problem with the input: printed as one line, exit code 2."""


def find_loss_log(path):
    """The CSV for a CSV path, a run folder, or (no path) the newest run under ./checkpoints."""
    if path is None:
        logs = sorted(Path("checkpoints").glob("*/loss_log.csv"), key=lambda p: p.stat().st_mtime)
        if not logs:
            raise PlotError("no checkpoints/*/loss_log.csv here; pass a run folder or a loss_log.csv")
        return logs[-1]
    path = Path(path)
    if path.is_dir():
        path = path / "loss_log.csv"
    if not path.is_file():
        raise PlotError(f"{path} does not exist; pass a run folder (checkpoints/<run>) or its loss_log.csv")
    return path


def read_loss_log(path):
    """The log's columns as float arrays, rows sorted by step."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PlotError(f"{path} is not a train_ddpm.py loss log (missing columns: {', '.join(missing)})")
        rows = list(reader)
    if not rows:
        raise PlotError(f"{path} has no rows yet; train for at least --log_every steps")
    # Training rows and validation rows fill different columns; a blank cell reads as NaN.
    try:
        columns = {name: np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])
                   for name in reader.fieldnames}
    except ValueError as e:
        raise PlotError(f"{path} has a malformed row ({e})") from None
    order = np.argsort(columns["step"], kind="stable")
    columns = {name: values[order] for name, values in columns.items()}
    if np.isnan(columns["loss"]).all():
        raise PlotError(f"{path} has no training-loss rows yet; train for at least --log_every steps")
    return columns


def rows_with(log, column):
    """The log restricted to the rows where `column` is filled in."""
    keep = ~np.isnan(log[column])
    return {name: values[keep] for name, values in log.items()}


def moving_average(values, window):
    """Trailing mean over `window` rows (shorter at the start), same length as values."""
    window = max(1, min(window, len(values)))
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumsum[1:] - cumsum[np.arange(1, len(values) + 1) - counts]) / counts


def plateau_diagnostic(loss, window=None):
    """Judge the last window of rows by the noise (std / mean) and the change across the window of a
    straight-line fit; a change within two standard errors of the fit counts as flat.
    Returns (verdict, explanation)."""
    window = window or max(10, len(loss) // 5)
    tail = loss[-window:]
    if len(tail) < 5:
        return "too early", f"only {len(tail)} log rows; train longer for a verdict"
    x = np.arange(len(tail))
    slope, intercept = np.polyfit(x, tail, 1)
    residuals = tail - (slope * x + intercept)
    slope_stderr = np.sqrt(residuals.var(ddof=2) / ((x - x.mean()) ** 2).sum())
    mean, noise = tail.mean(), tail.std() / tail.mean()
    change = slope * (len(tail) - 1) / mean
    significant = abs(slope) > 2 * slope_stderr
    detail = f"last {len(tail)} rows: std/mean {noise:.3f}, trend {change:+.1%}{'' if significant else ' (within the noise)'}"
    if significant and change < -0.01:
        return "still improving", f"{detail}; keep training"
    if significant and change > 0.01:
        return "stalled", f"{detail}; the loss is rising: lower the learning rate"
    if noise < 0.1:
        return "converged", f"{detail}; the loss is flat: more epochs mostly refine sample quality (watch the previews)"
    return "stalled", f"{detail}; the loss is flat but noisy: try a lower learning rate or a larger batch"


def epoch_boundaries(step, epoch):
    """Steps at which each new epoch began."""
    nonzero = epoch > 0
    if not nonzero.any():
        return np.array([])
    steps_per_epoch = np.median(step[nonzero] / epoch[nonzero])
    return np.arange(1, int(np.floor(epoch.max())) + 1) * steps_per_epoch


def resume_points(step, session):
    """First logged step of each resumed session."""
    return step[1:][np.diff(session) > 0]


def warm_restarts(step, lr):
    """Steps where the LR jumps up by more than half its range: the restarts of a cosine schedule
    (a warmup rises in many small steps and is not counted)."""
    span = lr.max() - lr.min()
    if span <= 0:
        return np.array([])
    return step[1:][np.diff(lr) > 0.5 * span]


def lr_schedule_check(step, lr, session=None, low=0.01):
    """Lines on what the logged LR did that loses training: more than a fifth of the logged steps
    below 1% of the peak, and jumps at a resume from such a floor back up (a cosine re-planned over
    a longer run). Each says which train_ddpm.py flag changes it."""
    lines, peak = [], lr.max()
    spans = np.diff(step, prepend=0.0)  # each row stands for the steps since the previous one
    warmed = np.arange(len(lr)) >= np.argmax(lr >= 0.99 * peak)  # a warmup's low start is by design
    below = (lr < low * peak) & warmed
    if spans.sum() > 0 and spans[below].sum() / spans.sum() > 0.2:
        lines.append(f"warning: the LR was below 1% of its peak {peak:g} for {spans[below].sum() / spans.sum():.0%} "
                     f"of the logged steps (from step {int(step[below.argmax()]):,}), which barely train: raise "
                     f"--min_lr, --step_size or --gamma, or give the cosine more steps with --cosine_until")
    if session is not None:
        for i in np.flatnonzero(np.diff(session) > 0) + 1:
            if lr[i - 1] < low * peak and lr[i] > 10 * lr[i - 1]:
                lines.append(f"note: at the resume at step {int(step[i]):,} the LR jumped from its floor "
                             f"{lr[i - 1]:.3g} to {lr[i]:.3g} (a cosine re-planned over the longer run); resuming "
                             f"with --cosine_until <the old last step> keeps it at the floor")
    return lines


QUARTILES = ("loss_q0", "loss_q1", "loss_q2", "loss_q3")
PSNR_T = (50, 250, 500, 750)  # train_ddpm.py's DENOISING_T: the t (of a 1,000-step chain) of each psnr_t column


def psnr_plateau(values, min_gain=0.1):
    """Whether a denoising PSNR series (one value per evaluation) still rises: the best of its last
    third against the best before, in dB. Returns (verdict, explanation)."""
    if len(values) < 4:
        return "too early", f"{len(values)} evaluations; a verdict needs 4"
    k = max(2, len(values) // 3)
    gain = values[-k:].max() - values[:-k].max()
    verdict = "still improving" if gain > min_gain else "plateaued"
    return verdict, f"{gain:+.2f} dB in the last {k} evaluations"


def has_column(log, name):
    return name in log and not np.isnan(log[name]).all()


def plot(log, out, smooth_window, title):
    train = rows_with(log, "loss")
    has_quartiles = all(q in log for q in QUARTILES) and not np.isnan(log["loss_q0"]).all()
    has_val = any(has_column(log, name) for name in ("val_loss", "fid"))
    has_psnr = has_column(log, "psnr_t50")
    extra = has_quartiles + has_val + has_psnr
    fig, axes = plt.subplots(1 + extra, 1, figsize=(11, 5.5 + 2.8 * extra), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2] + [1] * extra})
    plot_loss_and_lr(axes[0, 0], train, smooth_window)
    axes[0, 0].set_title(title)
    row = 1
    if has_quartiles:
        plot_quartiles(axes[row, 0], train, smooth_window)
        row += 1
    if has_val:
        plot_evaluations(axes[row, 0], log)
        row += 1
    if has_psnr:
        plot_psnr(axes[row, 0], log)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_quartiles(ax, train, smooth_window):
    """The loss per timestep quartile: the noisiest quarter (q3) is easy, the cleanest (q0) hard."""
    for q, name in enumerate(QUARTILES):
        rows = rows_with(train, name)
        ax.plot(rows["step"], moving_average(rows[name], smooth_window), linewidth=1.2,
                label=f"t in quartile {q} ({'cleanest' if q == 0 else 'noisiest' if q == 3 else 'middle'})")
    ax.set_yscale("log")
    ax.set_ylabel("loss by timestep")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, ncol=4, loc="upper right")


def plot_evaluations(ax, log):
    """The validation loss and, on a second axis, FID, each with its best point starred."""
    axes = [("val_loss", "validation loss (EMA, fixed t and noise)", "tab:purple", ax)]
    if "fid" in log and not np.isnan(log["fid"]).all():
        fid_ax = ax.twinx() if "val_loss" in log and not np.isnan(log["val_loss"]).all() else ax
        axes.append(("fid", "FID (training-time samples)", "tab:green", fid_ax))
    for name, label, colour, axis in axes:
        rows = rows_with(log, name) if name in log else None
        if rows is None or not len(rows[name]):
            continue
        axis.plot(rows["step"], rows[name], marker="o", markersize=3, color=colour, label=label)
        best = np.argmin(rows[name])
        axis.plot(rows["step"][best], rows[name][best], marker="*", markersize=12, color=colour, linestyle="none",
                  label=f"best {rows[name][best]:.4g} at step {int(rows['step'][best]):,}")
        axis.set_ylabel(name.replace("_", " "), color=colour)
        axis.legend(fontsize=8, loc="upper right" if axis is ax else "upper center")
    ax.grid(True, alpha=0.25)


def plot_psnr(ax, log):
    """The PSNR of the one-step x_0 prediction on the held-out images at each fixed t: low t is fine
    detail, high t the layout; each curve flattening says that noise level has stopped improving."""
    for k in PSNR_T:
        rows = rows_with(log, f"psnr_t{k}")
        ax.plot(rows["step"], rows[f"psnr_t{k}"], marker="o", markersize=3, label=f"t = {k} of 1000")
    ax.set_ylabel("PSNR of x_0 from x_t (dB)")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, ncol=4, loc="lower right")


def plot_loss_and_lr(ax, log, smooth_window):
    step, loss = log["step"], log["loss"]
    if smooth_window > 1:
        ax.plot(step, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        ax.plot(step, moving_average(loss, smooth_window), color="tab:blue", linewidth=1.8,
                label=f"loss, mean of {smooth_window} rows")
    else:
        ax.plot(step, loss, color="tab:blue", linewidth=1.5, label="loss")
    ax.set_yscale("log")
    ax.set_ylabel("loss (MSE of the noise)")
    ax.grid(True, which="both", alpha=0.25)

    boundaries = epoch_boundaries(step, log["epoch"])
    for i, s in enumerate(boundaries if len(boundaries) <= 200 else []):
        ax.axvline(s, color="gray", linewidth=0.5, linestyle=":", label="epoch" if i == 0 else None)
    if "session" in log:
        for i, s in enumerate(resume_points(step, log["session"])):
            ax.axvline(s, color="tab:red", linewidth=1.2, linestyle="--", label="resumed" if i == 0 else None)
    for i, s in enumerate(warm_restarts(step, log["lr"])):
        ax.axvline(s, color="tab:green", linewidth=1.0, linestyle="-.", label="warm restart" if i == 0 else None)

    lr_ax = ax.twinx()
    lr_ax.plot(step, log["lr"], color="tab:orange", linewidth=1.0, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lr_ax.tick_params(axis="y", colors="tab:orange")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    handles, labels = ax.get_legend_handles_labels()
    lr_handles, lr_labels = lr_ax.get_legend_handles_labels()
    ax.legend(handles + lr_handles, labels + lr_labels, loc="upper right", ncol=3, fontsize=8)


def run_title(log_path, log):
    log = rows_with(log, "loss")
    config_path = Path(log_path).with_name("config.json")
    name = Path(log_path).parent.name
    try:
        cfg = json.loads(config_path.read_text())
        name = f"{cfg.get('run_name', name)} ({cfg.get('preset', '?')}, T={cfg.get('timesteps', '?')})"
    except (OSError, ValueError):
        pass
    return f"{name}: {int(log['step'][-1]):,} steps, epoch {log['epoch'][-1]:.2f}"


def preview_grids(log_path):
    """The run's preview PNGs in epoch order, [(epoch, path)]: from the samples_dir and run_name in
    its config.json, read from here or from beside the run's checkpoint folder."""
    log_path = Path(log_path)
    try:
        cfg = json.loads(log_path.with_name("config.json").read_text())
        samples_dir, run_name = cfg["samples_dir"], cfg["run_name"]
    except (OSError, ValueError, KeyError):
        samples_dir, run_name = "samples", log_path.parent.name
    for root in (Path.cwd(), log_path.resolve().parent.parent.parent):
        folder = root / samples_dir / run_name
        found = sorted((int(m.group(1)), p) for p in folder.glob("epoch_*.png")
                       if (m := re.fullmatch(r"epoch_(\d+)\.png", p.name)))
        if found:
            return found
    return []


def write_progress_gif(grids, out, scale=2, frame_ms=400, last_frame_ms=2000):
    """An animated GIF of the preview grids, each frame the grid (scaled up, nearest neighbour) under
    a strip naming its epoch; frames are padded to the largest grid. Written atomically."""
    from PIL import Image, ImageDraw
    images = [Image.open(path).convert("RGB") for _, path in grids]
    width = max(im.width for im in images) * scale
    height = max(im.height for im in images) * scale + 16
    frames = []
    for (epoch, _), image in zip(grids, images):
        frame = Image.new("RGB", (width, height), "white")
        frame.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (0, 16))
        ImageDraw.Draw(frame).text((3, 2), f"epoch {epoch}", fill="black")
        frames.append(frame)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=[frame_ms] * (len(frames) - 1) + [last_frame_ms])
    os.replace(tmp, out)
    return len(frames)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="run folder or loss_log.csv (default: newest run in checkpoints/)")
    parser.add_argument("--out", help="PNG to write (default: loss_plot.png beside the log)")
    parser.add_argument("--smooth", type=int, default=None, help="rows in the moving average (default: 1/50 of the log, at least 5)")
    parser.add_argument("--progress", action="store_true", help="fail unless the run has previews for progress.gif "
                                                                "(written beside the plot whenever it has)")
    args = parser.parse_args(argv)
    try:
        if args.smooth is not None and args.smooth < 1:
            raise PlotError("--smooth must be at least 1")
        log_path = find_loss_log(args.path)
        log = read_loss_log(log_path)
        out = Path(args.out) if args.out else log_path.with_name("loss_plot.png")
        if not out.parent.is_dir():
            raise PlotError(f"cannot write {out}: folder {out.parent} does not exist")
        n_train = int((~np.isnan(log["loss"])).sum())
        smooth_window = args.smooth or min(n_train, max(5, n_train // 50))
        grids = preview_grids(log_path)
        if args.progress and not grids:
            raise PlotError(f"no preview grids (epoch_*.png) for {log_path.parent.name}: train with --sample_every 1")
        plot(log, out, smooth_window, run_title(log_path, log))
        if grids:
            frames = write_progress_gif(grids, out.with_name("progress.gif"))
    except PlotError as e:
        print(f"plot_loss.py: error: {e}", file=sys.stderr)
        return 2
    train = rows_with(log, "loss")
    verdict, detail = plateau_diagnostic(train["loss"])
    print(f"final loss {train['loss'][-1]:.4f} at step {int(train['step'][-1]):,}")
    for name, label in (("val_loss", "validation loss"), ("fid", "FID")):
        if has_column(log, name):
            values = rows_with(log, name)[name]
            print(f"{label} {values[-1]:.4f} (best {values.min():.4f})")
    for k in PSNR_T:
        if has_column(log, f"psnr_t{k}"):
            values = rows_with(log, f"psnr_t{k}")[f"psnr_t{k}"]
            psnr_verdict, psnr_detail = psnr_plateau(values)
            print(f"denoising PSNR at t={k} (of 1000): {values[-1]:.2f} dB (best {values.max():.2f}): "
                  f"{psnr_verdict} ({psnr_detail})")
    print(f"plateau check: {verdict} ({detail})")
    for line in lr_schedule_check(train["step"], train["lr"], train.get("session")):
        print(line)
    print(f"wrote {out}")
    if grids:
        print(f"wrote {out.with_name('progress.gif')} ({frames} previews, epochs {grids[0][0]}-{grids[-1][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
