"""Training and sampling speed of our UNet against diffusers' UNet2DModel (google/ddpm-cifar10-32).

    python bench/bench_train.py                        # batch 128 on CUDA if there is one, else the CPU
    python bench/bench_train.py --largest_batch        # GPU: also rows 1 and 3 at the largest batch that fits
    python bench/bench_train.py --batch 2 --steps 1 --warmup 1 --rows ours,diffusers   # smoke test
    git show HEAD~3:train_ddpm.py > /tmp/before.py
    python bench/bench_train.py --baseline /tmp/before.py --rows ours,baseline   # a change against the code before it

Both networks are the 35.7M-parameter DDPM UNet of Ho et al. 2020 and train on the same batch with
AdamW lr 2e-4, grad clip 1.0, the MSE on the noise at random t with x_t from our q_sample, and an
EMA update each step; only the network, the optimizer's kernel and the EMA code differ. One model
is built and timed at a time, from the same seed. Prints one Markdown table (train images/s, step
time, peak GPU memory, MFU, forward-only images*evals/s) and the ratios under it, for BENCHMARKS.md.
"""

import argparse
import datetime
import gc
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ddpm as td  # noqa: E402

try:
    import diffusers
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
except ImportError:  # our rows still run (a fresh GPU machine without it, say); the diffusers rows are dropped
    diffusers = None

SEED = 0
# google/ddpm-cifar10-32's config.json: the same network as ours, block for block.
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
# key: (row name, which network, overrides of the ddpm_paper preset)
ROWS = {
    "ours": ("ours (train_ddpm.py defaults)", "ours", {}),
    "ours_fp32": ("ours, fp32", "ours", {"amp": "off"}),
    "diffusers": ("diffusers UNet2DModel (fp32, as its training script runs by default)", "diffusers", {"amp": "off"}),
    # amp auto is bf16 exactly where the brief's condition holds: bf16-capable GPU, or a CPU with native bf16.
    "diffusers_bf16": ("diffusers UNet2DModel, bf16 autocast", "diffusers", {"amp": "auto"}),
    "ours_compile": ("ours + torch.compile", "ours", {"compile": True}),
    "baseline": ("ours, the --baseline train_ddpm.py (its defaults)", "baseline", {}),
}
BASELINE = None  # --baseline: another train_ddpm.py, imported as a module
DEFAULT_ROWS = "ours,ours_fp32,diffusers,diffusers_bf16"
# Dense bf16 tensor-core peaks (fp16 for the V100), TFLOP/s, by device-name substring: first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
               ("L40S", 362), ("4090", 165), ("V100", 125)]


def flops_per_image(cfg, batch=2):
    """FLOPs of one fp32 training step (forward + backward) of our UNet, per image. Attention runs on
    its math backend here, as FlopCounterMode has no formula for the CPU's fused kernel."""
    model, diffusion = td.build_model(cfg), td.build_diffusion(cfg)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        diffusion.loss(model, x).backward()
    return counter.get_total_flops() / batch


def peak_flops(args, device):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)
    return None  # a CPU's peak depends on its clocks and vector units: no honest number


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, steps, warmup, device):
    for i in range(warmup):  # compile, cuDNN autotuning, allocator growth, optimizer state
        fn(i)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    sync(device)
    return (time.perf_counter() - start) / steps


def build_ours(cfg, device, diffusion, td=td):
    """Our training step exactly as train_ddpm.train() runs it (td: this train_ddpm or the
    --baseline one); returns (params, step, evaluate)."""
    layout, dtype = td.use_channels_last(cfg.channels_last, device), td.autocast_dtype(cfg.amp, device)
    model = td.place_model(td.build_model(cfg), device, layout)
    forward = td.Precision(torch.compile(model) if cfg.compile else model, device, dtype, layout)
    optimizer = td.build_optimizer(model, cfg)
    ema = td.EMA(model, cfg.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x, t, noise, i):
        if hasattr(td, "Batch"):
            td.train_step(forward, diffusion, td.Batch(x, t, noise), optimizer, scaler, cfg.grad_clip)
        else:  # a train_ddpm.py from before the Batch
            td.train_step(forward, model, diffusion, x, t, noise, optimizer, scaler, cfg.grad_clip)
        ema.update(model, i)

    def evaluate(x, t):
        forward.eval()  # Precision passes eval() on to the net: dropout off, as the samplers do
        return forward(x, t)

    return td.count_parameters(model), step, evaluate


def build_diffusers(cfg, device, diffusion):
    """diffusers' train_unconditional.py step: autocast (as accelerate applies it) around the forward,
    F.mse_loss in fp32, default AdamW, clip_grad_norm_, EMAModel with its default per-tensor loop."""
    dtype = td.autocast_dtype(cfg.amp, device)
    model = UNet2DModel(**DIFFUSERS_CIFAR10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)

    def predict(x, t):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(x, t).sample.float()

    def step(x, t, noise, i):
        loss = F.mse_loss(predict(diffusion.q_sample(x, t, noise), t), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    def evaluate(x, t):
        model.eval()
        return predict(x, t)

    return sum(p.numel() for p in model.parameters()), step, evaluate


def build_row(key, batch, device):
    """One row's (params, train(i), evaluate()) on a fixed batch, t and noise."""
    _, network, overrides = ROWS[key]
    cfg = td.preset_config("ddpm_paper", overrides)
    diffusion = td.build_diffusion(cfg).to(device)
    torch.manual_seed(SEED)
    if network == "diffusers":
        params, step, evaluate = build_diffusers(cfg, device, diffusion)
    else:
        params, step, evaluate = build_ours(cfg, device, diffusion, BASELINE if network == "baseline" else td)
    torch.manual_seed(SEED)  # again: the two inits draw differently, the batch, t and noise must not
    x0 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    noise = torch.randn_like(x0)
    return params, (lambda i: step(x0, t, noise, i)), (lambda: evaluate(noise, t))


def measure_interleaved(keys, batch, args, device):
    """Time every row's training step, then its forward pass, one call of each row in turn, round
    after round, and keep each row's median: a shared machine's slow spells then hit all rows alike
    instead of whichever row was running. All rows' models are alive at once."""
    rows = {key: build_row(key, batch, device) for key in keys}
    results = {key: dict(key=key, params=rows[key][0], batch=batch, memory=None) for key in keys}
    for phase in ("step_s", "eval_s"):
        times = {key: [] for key in keys}
        for i in range(args.warmup + args.steps):
            for key in keys:
                print(f"  {phase} round {i + 1}: {key}", file=sys.stderr, flush=True)
                _, train, evaluate = rows[key]
                start = time.perf_counter()
                if phase == "step_s":
                    train(i)
                else:
                    with torch.no_grad():
                        evaluate()
                sync(device)
                times[key].append(time.perf_counter() - start)
        for key in keys:
            results[key][phase] = statistics.median(times[key][args.warmup:])
    for r in results.values():
        r["train"], r["sample"] = batch / r["step_s"], batch / r["eval_s"]
    return results


def measure(key, batch, args, device):
    """Build one row's model alone, time its training step, then its forward pass; everything it built
    is garbage once this returns. Raises RuntimeError (see out_of_memory) when the batch does not fit."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    params, train, evaluate = build_row(key, batch, device)
    step_s = seconds_per_call(train, args.steps, args.warmup, device)
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    with torch.no_grad():
        eval_s = seconds_per_call(lambda i: evaluate(), args.steps, args.warmup, device)
    return dict(key=key, params=params, batch=batch, step_s=step_s, memory=memory,
                train=batch / step_s, sample=batch / eval_s)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


ALLOCATION_FAILURES = ("out of memory", "ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED", "CUDNN_STATUS_INTERNAL_ERROR",
                       "CUDNN_STATUS_EXECUTION_FAILED")


def out_of_memory(error):
    """torch's OutOfMemoryError, or cuBLAS's and cuDNN's plain RuntimeError when their workspace
    cannot be allocated; any other error is a bug and is raised."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(s in str(error) for s in ALLOCATION_FAILURES)


def largest_batch(key, args, device):
    """Double the batch from 128 until it runs out of GPU memory; the last result that fitted."""
    best, batch = None, 128
    while True:
        print(f"  {key}: trying batch {batch}", file=sys.stderr, flush=True)
        try:
            result = measure(key, batch, args, device)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            result = None
        free(device)  # after the except block, which let go of the traceback and the tensors it held
        if result is None:
            return best
        best, batch = result, batch * 2


def row_name(key, device):
    if key != "ours":
        return ROWS[key][0]
    cfg = td.preset_config("ddpm_paper", {})  # say what the defaults resolved to on this device
    precision = "fp32" if td.autocast_dtype(cfg.amp, device) is None else "bf16 autocast"
    layout = "channels_last" if td.use_channels_last(cfg.channels_last, device) else "NCHW"
    return f"ours (train_ddpm.py defaults: {precision}, {layout})"


def ratio(results, a, b, field):
    if a in results and b in results:
        return f"{results[a][field] / results[b][field]:.2f}x"
    return "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--largest_batch", action="store_true",
                        help="GPU: also rows ours and diffusers at the largest power-of-two batch that fits")
    parser.add_argument("--compile", action="store_true", help="add the row ours_compile (slower on CPU)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: known GPUs' dense bf16 peak; none on CPU)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--baseline", metavar="FILE", help="another train_ddpm.py (e.g. from git show) for the row "
                                                           "baseline, timed beside ours in the same rounds")
    args = parser.parse_args()
    keys = [k for k in args.rows.split(",") if k] + (["ours_compile"] if args.compile else [])
    if "baseline" in keys:
        if not args.baseline:
            parser.error("the row baseline needs --baseline FILE")
        global BASELINE
        import importlib.util
        spec = importlib.util.spec_from_file_location("train_ddpm_baseline", args.baseline)
        BASELINE = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        spec.loader.exec_module(BASELINE)
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    keys = list(dict.fromkeys(keys))

    device = td.pick_device("auto")
    if args.largest_batch and device.type != "cuda":
        parser.error("--largest_batch needs a GPU")
    args.steps = args.steps or (5 if device.type == "cuda" else 3)
    if device.type == "cuda":
        td.set_fast_math(True)  # train_ddpm.py's defaults (tf32, cudnn.benchmark); process-wide, so every row
    cfg = td.preset_config("ddpm_paper", {})
    flops = flops_per_image(cfg)
    peak = peak_flops(args, device)
    notes = []
    if diffusers is None and any(ROWS[k][1] == "diffusers" for k in keys):
        keys = [k for k in keys if ROWS[k][1] != "diffusers"]
        notes.append("diffusers rows skipped: diffusers is not installed (pip install -r bench/requirements.txt)")
    if "diffusers_bf16" in keys and td.autocast_dtype("auto", device) is None:
        keys.remove("diffusers_bf16")
        notes.append("diffusers bf16 row skipped: no native bf16 on this device")

    extra = []
    results = measure_interleaved(keys, args.batch, args, device)
    if device.type == "cuda":  # peak memory needs each row alone
        for key in keys:
            results[key]["memory"] = measure(key, args.batch, args, device)["memory"]
            free(device)
    free(device)
    if args.largest_batch:
        for key in ("ours", "diffusers")[:2 if diffusers else 1]:
            print(f"largest batch for {key}", file=sys.stderr, flush=True)
            if (r := largest_batch(key, args, device)) is not None:
                extra.append(r)
    counts = {r["params"] for r in [*results.values(), *extra]}
    assert len(counts) <= 1, f"the two UNets differ in size: {sorted(counts)} parameters"

    print(f"\ndevice: {device} ({device_name(device)}) | torch {torch.__version__} | diffusers {diffusers.__version__ if diffusers else '-'} "
          f"| {datetime.date.today()}")
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"UNet: {counts.pop():,} parameters; {flops / 1e9:.1f} GFLOP per image per training step (fwd+bwd, "
          f"FlopCounterMode); median of {args.steps} timed steps after {args.warmup} warm-up, rows interleaved"
          + ("; TF32 and cudnn.benchmark on for every row" if device.type == "cuda" else "")
          + (f"; MFU against {peak / 1e12:.0f} TFLOP/s for every row" if peak else "") + "\n")
    print("| row | batch | train images/s | step ms | peak GPU memory | MFU | sampling images·evals/s |")
    print("|---|---|---|---|---|---|---|")
    for r in [*results.values(), *extra]:
        memory = "-" if r["memory"] is None else f"{r['memory']:.1f} GB"
        mfu = f"{100 * flops * r['train'] / peak:.0f}%" if peak else "-"
        print(f"| {row_name(r['key'], device)} | {r['batch']} | {r['train']:.1f} | {1e3 * r['step_s']:.0f} "
              f"| {memory} | {mfu} | {r['sample']:.1f} |")
    print(f"\n- ours defaults / diffusers default: train {ratio(results, 'ours', 'diffusers', 'train')}, "
          f"sampling {ratio(results, 'ours', 'diffusers', 'sample')}")
    print(f"- like for like, bf16 (ours / diffusers bf16): train {ratio(results, 'ours', 'diffusers_bf16', 'train')}, "
          f"sampling {ratio(results, 'ours', 'diffusers_bf16', 'sample')}")
    print(f"- like for like, fp32 (ours fp32 / diffusers): train {ratio(results, 'ours_fp32', 'diffusers', 'train')}, "
          f"sampling {ratio(results, 'ours_fp32', 'diffusers', 'sample')}")
    if "baseline" in results:
        print(f"- this train_ddpm.py / the --baseline one: train {ratio(results, 'ours', 'baseline', 'train')}, "
              f"sampling {ratio(results, 'ours', 'baseline', 'sample')}")
    if len(extra) == 2:
        ours, theirs = extra
        print(f"- at the largest batch each fits (ours {ours['batch']}, diffusers {theirs['batch']}): "
              f"train {ours['train'] / theirs['train']:.2f}x, sampling {ours['sample'] / theirs['sample']:.2f}x")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
