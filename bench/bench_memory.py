"""What --grad_checkpointing saves and costs, and the largest batch each preset fits per GPU size.

    python bench/bench_memory.py            # prints one Markdown table

Counted on the CPU for every preset, fp32: the bytes of activations one training image leaves for
the backward pass, without and with --grad_checkpointing. Without, they are the tensors autograd
saves (saved_tensors_hooks, one entry per storage). With, the checkpointed blocks save nothing
inside; what remains is what autograd saves outside them plus each block's inputs, which the
recomputation needs. From these: the largest batch per GPU size, estimated as (memory - 1 GB for
the CUDA context and allocator slack - 20 bytes per parameter for weights, gradients, two AdamW
moments and EMA) / activations per image, fp32 (bf16 autocast stores about half). Measured: the CPU
step time with and without checkpointing (small presets, side by side), and on a GPU, when there
is one, the peak CUDA memory of a step at the preset's batch.
"""

import torch

from preset_table import cpu_step_seconds, td  # bench/ is first on sys.path when a script here runs

GPU_GB = (8, 16, 24, 40, 80)
RESERVED_BYTES = 1e9


def activation_bytes_per_image(cfg, checkpointing, batch=2):
    model, diffusion = td.build_model(cfg), td.build_diffusion(cfg)
    model.grad_checkpointing = checkpointing
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    saved = {}  # storage -> bytes: autograd often saves one tensor for several ops

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def keep_inputs(block, inputs):
        for tensor in inputs:
            keep(tensor)

    hooks = [b.register_forward_pre_hook(keep_inputs) for b in model.modules()
             if checkpointing and isinstance(b, td.ResBlock)]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = diffusion.loss(model, x)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return sum(saved.values()) / batch


def largest_batches(params, per_image):
    return "/".join(str(max(0, int((gb * 1e9 - RESERVED_BYTES - 20 * params) // per_image))) for gb in GPU_GB)


def cuda_peak_gb(cfg, checkpointing):
    device = torch.device("cuda")
    model = td.build_model(cfg).to(device)
    model.grad_checkpointing = checkpointing
    diffusion = td.build_diffusion(cfg).to(device)
    optimizer = td.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    forward = td.Precision(model, device, torch.bfloat16)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), device=device)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step has the AdamW state too
        td.train_step(forward, diffusion, td.Batch(x, t, torch.randn_like(x)), optimizer, scaler, 1.0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    del model, optimizer
    torch.cuda.empty_cache()
    return peak


def main():
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          f"{', ' + torch.cuda.get_device_name() if cuda else ', no GPU'}\n")
    print(f"| preset | params | activations/image, MB: plain / checkpointed | largest batch at "
          f"{'/'.join(map(str, GPU_GB))} GB: plain | checkpointed | CPU step, checkpointed / plain"
          f"{' | CUDA peak GB at its batch, bf16: plain / checkpointed' if cuda else ''} |")
    print(f"|---|---|---|---|---|---|{'---|' if cuda else ''}")
    for name in td.PRESETS:
        cfg = td.preset_config(name, {})
        params = td.count_parameters(td.build_model(cfg))
        plain, ckpt = (activation_bytes_per_image(cfg, c) for c in (False, True))
        cost = "-"
        if params < 10e6:
            times = [cpu_step_seconds(cfg, 32, 4, c) for c in (False, True, False, True)]  # interleaved
            cost = f"{(times[1] + times[3]) / (times[0] + times[2]):.2f}x"
        row = (f"| {name} | {params / 1e6:.2f}M | {plain / 1e6:.2f} / {ckpt / 1e6:.2f} "
               f"| {largest_batches(params, plain)} | {largest_batches(params, ckpt)} | {cost}")
        if cuda:
            row += f" | {cuda_peak_gb(cfg, False):.1f} / {cuda_peak_gb(cfg, True):.1f}"
        print(row + " |")


if __name__ == "__main__":
    main()
