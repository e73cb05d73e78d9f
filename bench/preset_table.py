"""Size and cost of every preset: parameters, training FLOPs per image, memory, time per epoch.

    python bench/preset_table.py            # all presets, prints one Markdown table

Measured here: parameters; FLOPs of one training step (forward + backward) per image, counted with
torch.utils.flop_counter; the activations autograd saves per image (fp32), counted with
saved_tensors_hooks; and the CPU's training throughput for the small presets.
Derived: training memory = 16 bytes per parameter (weights, gradients, two AdamW moments) + 4 (EMA)
+ saved activations x batch; GPU minutes per 50,000-image epoch scaled from the published fp32
throughput of the paper's model on a V100 (about 240 images/s), assuming time proportional to FLOPs.
"""

import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_ddpm as td  # noqa: E402

V100_PAPER_MODEL_IMAGES_PER_S = 240.0
CIFAR10_TRAIN_IMAGES = 50_000


def training_step_cost(cfg, batch=2):
    """(FLOPs per image, bytes of saved activations per image) of one fp32 training step."""
    model, diffusion = td.build_model(cfg), td.build_diffusion(cfg)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    saved = {}  # one entry per storage: autograd often saves the same tensor for several ops

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    # Attention on its math backend: FlopCounterMode has no formula for the CPU's fused kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = diffusion.loss(model, x)
        loss.backward()
    return counter.get_total_flops() / batch, sum(saved.values()) / batch


def cpu_step_seconds(cfg, batch=32, steps=5, checkpointing=False):
    """Seconds per fp32 training step on the CPU, after one warm-up step."""
    model, diffusion = td.build_model(cfg), td.build_diffusion(cfg)
    model.grad_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step():
        t, noise = torch.randint(0, diffusion.num_timesteps, (batch,)), torch.randn_like(x)
        td.train_step(model, diffusion, td.Batch(x, t, noise), optimizer, scaler, 1.0)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def cpu_images_per_s(cfg, batch=32, steps=5):
    return batch / cpu_step_seconds(cfg, batch, steps)


def main():
    paper_flops, _ = training_step_cost(td.preset_config("ddpm_paper", {}))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| preset | params | GFLOP/img (train) | batch | est. GPU memory | est. V100 min/epoch | CPU img/s |")
    print("|---|---|---|---|---|---|---|")
    for name in td.PRESETS:
        cfg = td.preset_config(name, {})
        params = td.count_parameters(td.build_model(cfg))
        flops, act_bytes = training_step_cost(cfg)
        memory_gb = (20 * params + act_bytes * cfg.batch_size) / 1e9
        images_per_s = V100_PAPER_MODEL_IMAGES_PER_S * paper_flops / flops
        epoch_images = min(cfg.train_subset or CIFAR10_TRAIN_IMAGES, CIFAR10_TRAIN_IMAGES)
        cpu = f"{cpu_images_per_s(cfg):.0f}" if params < 2e6 else "-"
        minutes = epoch_images / images_per_s / 60
        minutes_text = f"{minutes:.1f}" if minutes >= 0.1 else "<0.1"
        print(f"| {name} | {params / 1e6:.2f}M | {flops / 1e9:.1f} | {cfg.batch_size} | {memory_gb:.1f} GB "
              f"| {minutes_text} | {cpu} |")


if __name__ == "__main__":
    main()
