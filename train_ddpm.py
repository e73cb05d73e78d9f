"""Train a denoising diffusion probabilistic model (DDPM) on CIFAR-10 or a folder of images.

One file, read top to bottom: the whole DDPM first (config and presets, data, the UNet, hardware,
Gaussian diffusion, the samplers, training, run safety, sampling and evaluating a checkpoint, the
command line), then the optional extras (pictures, FID and KID, safetensors files and diffusers
folders); a reader who stops at the extras has read the whole method.

    python train_ddpm.py --mode train                          # menu of presets on a terminal
    python train_ddpm.py --mode train --preset quick_test      # a few minutes on a CPU
    python train_ddpm.py --mode train --preset ddpm_paper      # Ho et al. 2020, exactly
    python train_ddpm.py --mode train --run_name quick_test_ts100 --resume latest
    python train_ddpm.py --mode sample --checkpoint checkpoints/quick_test_ts100 --sampler ddim --sampling_steps 50
    python train_ddpm.py --mode sample --checkpoint checkpoints/quick_test_ts100 --sampler dpmpp2m --sampling_steps 20
    python train_ddpm.py --mode eval --checkpoint checkpoints/quick_test_ts100 --num_samples 2000
    python train_ddpm.py --mode lr_find --preset cpu_hour                # loss against LR; a suggested LR

Presets: quick_test, cpu_hour, cifar10, cifar10_optimized, cifar10_cond, ddpm_paper, best_quality,
fastest, low_memory, gpu_speedrun.

Papers: Ho, Jain & Abbeel 2020 (DDPM); Nichol & Dhariwal 2021 (cosine schedule); Song, Meng &
Ermon 2021 (DDIM); Lu et al. 2022 (DPM-Solver++); Ho & Salimans 2022 (classifier-free guidance);
Saharia et al. 2022 (dynamic thresholding); Karras et al. 2024 (EDM2's power-function and post-hoc
EMA; autoguidance); Karras et al. 2022 (EDM: training's log-normal noise levels); Smith 2017 (the
learning-rate range test of --mode lr_find).
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm.auto import tqdm


# --- Config and presets ------------------------------------------------------------------------

# Training's timestep densities, as a normal (mean, std) of the log-SNR lambda = log(abar / (1 - abar))
# that each draws (None: uniform over the T steps). EDM (Karras et al. 2022, Table 1): log sigma ~
# N(-1.2, 1.2^2), and sigma^2 = 1 / SNR, so lambda = -2 log sigma ~ N(2.4, 2.4^2).
T_SAMPLING = {"uniform": None, "lognormal": (2.4, 2.4)}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


def _field(default, help, **meta):
    """A Config field with its --help text and what else the script knows of it: choices, aliases
    (more flag names), arch (the weights or the schedule depend on it: --init_from takes it from the
    checkpoint), resume (a resumed run may change it), menu (its place in the interactive menu) and
    legacy (its value in checkpoints from before the option existed)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Config:
    """Everything a training run depends on. Flags, the menu and checkpoints are all built from it.

    Precedence, lowest first: these defaults <- preset <- checkpoint (on resume) <- explicit flags."""
    # run
    preset: str = _field("cifar10", "preset the run started from")
    run_name: str = _field("", "run directory under checkpoint_dir and samples_dir (default: <preset>_ts<timesteps>)",
                           resume=True)
    checkpoint_dir: str = _field("checkpoints", "where run directories with checkpoints and logs go", resume=True)
    samples_dir: str = _field("samples", "where run directories with preview grids and samples go", resume=True)
    init_from: str = _field("", "start a new run's weights (and EMA) from this checkpoint, .safetensors export or "
                                "diffusers folder (fine-tuning): its model and schedule are used; the optimizer, "
                                "step and LR schedule start fresh")
    # data
    dataset: str = _field("cifar10", "training images", choices=("cifar10", "folder"))
    data_dir: str = _field("./data", "CIFAR-10 download folder, or the image folder for --dataset folder", resume=True)
    image_size: int = _field(32, "image side in pixels (folder images are resized and center-cropped)", arch=True)
    flip: bool = _field(True, "random horizontal flips (--no_flip to disable)")
    train_subset: int = _field(0, "train on a fixed random N of the images (0 = all), for quick runs")
    class_conditional: bool = _field(False, "train with class labels: CIFAR-10's 10 classes, or a folder's first-level "
                                            "subfolders (data_dir/<class>/...); sample with --class_label and "
                                            "--guidance_scale", arch=True)
    class_dropout: float = _field(0.1, "fraction of training labels replaced by 'no class', so one network is both "
                                       "conditional and unconditional (classifier-free guidance)")
    guidance_scale: float = _field(1.0, "guidance w of previews and samples: with --guide, autoguidance; else, for "
                                        "a class-conditional model, classifier-free guidance eps_uncond + "
                                        "w (eps_cond - eps_uncond): 1 = conditional, 0 = unconditional, above 1 "
                                        "stresses the class", resume=True)
    guide: str = _field("", "autoguidance of previews and FID during training: a checkpoint (or run folder) of a "
                            "weaker model of the same task, e.g. an early one of a run like this, and "
                            "--guidance_scale w: eps_guide + w (eps - eps_guide). --mode sample and eval: --guide "
                            "guides their samples", resume=True)
    guide_ema_length: float = _field(0.0, "the guide's power EMA of this length (its run trained with "
                                          "--ema_profiles); 0 = its --ema_decay EMA", resume=True)
    val_size: int = _field(1000, "images for the validation loss: CIFAR-10's test split, or held out of a "
                                 "folder (at most a tenth of it); 0 = no validation")
    # model: the DDPM UNet (Ho et al. 2020, Appendix B)
    base_channels: int = _field(128, "UNet width at full resolution", aliases=("hidden_dim",), arch=True, menu=5)
    channel_mults: tuple = _field((1, 2, 2, 2), "width multiplier per resolution level, e.g. 1,2,2,2", arch=True)
    num_res_blocks: int = _field(2, "residual blocks per resolution level", arch=True)
    use_attention: bool = _field(True, "self-attention blocks at all (off: no attention anywhere)", arch=True, menu=6)
    attn_resolutions: tuple = _field((16,), "resolutions with self-attention, e.g. 16 or 16,8", arch=True)
    dropout: float = _field(0.1, "dropout inside residual blocks")
    emb_dim: int = _field(512, "width of the timestep-embedding MLP", aliases=("time_emb_dim",), arch=True)
    norm_groups: int = _field(32, "GroupNorm groups (the paper: 32); a norm whose width it does not divide takes "
                                  "their greatest common divisor", arch=True)
    norm_min_channels: int = _field(4, "fewest channels in a GroupNorm group (the paper's 128-wide levels have 4); "
                                       "narrow levels get fewer groups. One channel per group would erase the "
                                       "timestep embedding, a per-channel constant, leaving that block blind to t",
                                    arch=True, legacy=1)
    norm_eps: float = _field(1e-6, "GroupNorm epsilon (the paper's TensorFlow value; checkpoints from before "
                                   "this option used PyTorch's 1e-5)", arch=True, legacy=1e-5)
    downsample_padding: str = _field("same", "padding of the stride-2 downsampling conv: same pads bottom and right "
                                             "only (TensorFlow, the paper), symmetric pads every side (checkpoints "
                                             "from before this option)", choices=("same", "symmetric"), arch=True,
                                 legacy="symmetric")
    # diffusion
    timesteps: int = _field(1000, "number of diffusion steps T", arch=True, menu=3)
    schedule_type: str = _field("linear", "beta schedule", choices=("linear", "cosine"), arch=True, menu=4)
    beta_start: float = _field(1e-4, "first beta of the linear schedule", arch=True)
    beta_end: float = _field(0.02, "last beta of the linear schedule", arch=True)
    cosine_s: float = _field(0.008, "offset s of the cosine schedule (Nichol & Dhariwal 2021)", arch=True)
    # where training spends its noise levels
    t_sampling: str = _field("uniform", "how training draws each image's timestep: uniform over [0, T) (Ho et al.) "
                                        "or lognormal (EDM's log sigma ~ N(-1.2, 1.2^2), sigma = "
                                        "sqrt((1 - abar) / abar), as that density's mass in each timestep's log-SNR "
                                        "interval)", choices=tuple(T_SAMPLING))
    # optimisation
    learning_rate: float = _field(2e-4, "peak AdamW learning rate", aliases=("lr",), menu=2)
    weight_decay: float = _field(0.0, "AdamW weight decay (0 makes it Adam, as in the paper)")
    warmup_steps: int = _field(1000, "linear learning-rate warmup, in optimizer steps")
    scheduler: str = _field("cosine_restarts", "learning rate after warmup: cosine_restarts (CosineAnnealingWarmRestarts, "
                                               "--restart_period), cosine (one cosine down to --min_lr at the run's "
                                               "last step, --epochs or --max_steps, or at --cosine_until), constant "
                                               "(the paper; none is the same), step (times --gamma every --step_size "
                                               "epochs, StepLR)",
                            choices=("cosine_restarts", "cosine", "constant", "step", "none"),
                            value_aliases={"none": "constant"}, menu=7)
    restart_period: int = _field(10, "epochs until the first warm restart (CosineAnnealingWarmRestarts T_0)")
    restart_mult: int = _field(1, "each restart period is this many times longer (T_mult)")
    min_lr: float = _field(1e-6, "lowest learning rate of the cosine schedules")
    cosine_until: int = _field(0, "--scheduler cosine reaches --min_lr at this step and stays there (0 = the run's "
                                  "last step): resume a finished cosine run with more --epochs and this at its old "
                                  "last step to keep the LR at its floor instead of decaying again from near the "
                                  "peak", resume=True)
    step_size: int = _field(30, "--scheduler step: epochs between LR drops (StepLR's step_size)")
    gamma: float = _field(0.1, "--scheduler step: each drop multiplies the LR by this (StepLR's gamma)")
    grad_clip: float = _field(0.5, "clip gradients to this global norm (0 = no clipping)", menu=8)
    ema_decay: float = _field(0.9999, "EMA decay of the weights used for previews and sampling")
    ema_profiles: tuple = _field((), "also track power-function EMAs of these relative lengths sigma_rel "
                                     "(EDM2), e.g. 0.05,0.10, and save them every --ema_snapshot_every images, so "
                                     "that --mode sample and eval can reconstruct the EMA of any --ema_length "
                                     "after training", item=float)
    ema_snapshot_every: int = _field(0, "with --ema_profiles: write the profiles (fp16) to <run>/ema_snapshots/ "
                                        "every this many training images", resume=True)
    batch_size: int = _field(128, "images per optimizer step", menu=1)
    epochs: int = _field(500, "passes over the training set", resume=True, menu=0)
    max_steps: int = _field(0, "stop after this many optimizer steps in total (0 = no limit)", resume=True)
    max_minutes: float = _field(0.0, "stop after this many minutes of the run (all its sessions; 0 = no limit): "
                                     "preview, save, and resume later with a larger value", resume=True)
    seed: int = _field(0, "seed for weights, data order, noise and previews")
    device: str = _field("auto", "where to train", choices=("auto", "cpu", "cuda"), resume=True)
    # speed: none of these changes what is computed beyond float rounding
    amp: str = _field("auto", "mixed precision of the UNet: auto (bf16 where the GPU or CPU runs it natively, "
                              "else off), bf16, fp16 (with loss scaling) or off", choices=("auto", "bf16", "fp16", "off"),
                      resume=True)
    channels_last: str = _field("auto", "channels-last memory layout for the convolutions (auto: on GPUs)",
                                choices=("auto", "true", "false"), resume=True)
    tf32: bool = _field(True, "TF32 tensor cores for the fp32 matmuls and convolutions (Ampere or newer GPUs)",
                        resume=True)
    compile: bool = _field(False, "torch.compile the UNet: minutes of compiling first, faster steps after "
                                  "(for long GPU runs)", resume=True)
    fused_adamw: bool = _field(True, "one fused AdamW kernel for all parameters", resume=True)
    # memory: the same update to float rounding, in less memory
    grad_accum: int = _field(1, "split each step's --batch_size images into this many micro-batches, one forward "
                                "and backward each, summed into one update (less memory, same math)", resume=True)
    grad_checkpointing: bool = _field(False, "recompute the residual and attention blocks' activations in the backward "
                                             "pass instead of storing them (less memory, slower steps)", resume=True)
    num_workers: int = _field(4, "threads that decode an image folder (CIFAR-10 needs none)", aliases=("workers",),
                              resume=True)
    # monitoring and saving
    log_every: int = _field(50, "write a loss-log row every this many steps", aliases=("log_interval",), resume=True)
    sample_every: int = _field(1, "write a preview grid every this many epochs (0 = never)", resume=True, menu=9)
    num_preview: int = _field(10, "images in each preview grid", resume=True)
    preview_steps: int = _field(50, "DDIM steps used for previews", resume=True)
    clip_x0: str = _field("static", "how the samplers hold each step's predicted x_0 in [-1, 1]: static clamps "
                                    "every value (Ho et al.), dynamic divides by the image's 99.5th percentile of "
                                    "|x_0| when above 1 (Imagen's dynamic thresholding), none leaves it. A run's "
                                    "previews and FID use it; --mode sample and eval use the checkpoint's unless "
                                    "given (samples named _clip<rule> unless static)",
                          choices=("static", "dynamic", "none"), resume=True)
    save_every: int = _field(10, "save a checkpoint every this many epochs (and always at the end)",
                            aliases=("save_freq",), resume=True, menu=10)
    save_every_steps: int = _field(0, "also save latest.pt every this many steps (0 = off), so a crash "
                                      "loses minutes, not an epoch", resume=True)
    save_every_minutes: float = _field(30.0, "also save latest.pt every this many minutes (0 = off; the paper's "
                                             "code saved every 1600 s)", resume=True)
    max_bad_steps: int = _field(20, "stop (saving the last good weights) after this many consecutive steps "
                                    "with a non-finite loss or gradient; each such step is skipped", resume=True)
    keep_last: int = _field(0, "keep only the newest N epoch checkpoints (0 = keep all)", resume=True)
    early_stopping: bool = _field(False, "stop when the validation loss (or FID, with --fid_every) has not "
                                         "improved for --patience evaluations", resume=True)
    patience: int = _field(10, "evaluations without improvement before early stopping",
                          aliases=("early_stopping_patience",), resume=True)
    fid_every: int = _field(0, "compute FID every this many epochs with 20-step DPM-Solver++ (0 = never; "
                               "needs pip install pytorch-fid)", resume=True)
    fid_samples: int = _field(10_000, "samples per FID during training", resume=True)
    fid_weights: str = _field("", "local FID Inception weights (pytorch-fid's pt_inception-2015-12-05 file); "
                                  "empty: download them once", resume=True)
    tensorboard: bool = _field(False, "also log scalars and preview grids to TensorBoard (pip install tensorboard)",
                               resume=True)
    wandb: bool = _field(False, "also log to Weights & Biases (pip install wandb): the config, loss rows, "
                                "validation, FID and preview grids; every session of a run logs to the same W&B "
                                "run (its id in <run>/wandb_run_id); WANDB_MODE=offline keeps it on this machine",
                         resume=True)
    wandb_project: str = _field("train_ddpm", "the W&B project of --wandb", resume=True)


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _fields_with(key):
    return tuple(name for name, f in CONFIG_FIELDS.items() if key in f.metadata)


# What the weights were trained for: a run started --init_from a checkpoint takes these from it.
ARCHITECTURE_FIELDS = _fields_with("arch")
# A resumed run may change only how it is driven and watched; anything else would silently make it
# a different run (architecture, schedule, optimisation, data order).
RESUME_MAY_CHANGE = _fields_with("resume")
# The hyperparameters the menu asks for, in order.
MENU_FIELDS = tuple(sorted(_fields_with("menu"), key=lambda name: CONFIG_FIELDS[name].metadata["menu"]))
# What checkpoints from before an option was added were trained with.
LEGACY_VALUES = {name: CONFIG_FIELDS[name].metadata["legacy"] for name in _fields_with("legacy")}


# Presets hold overrides of Config only, so a typo in a key fails at import (Config(**preset)).
PRESETS = {
    # Shorter chains scale the paper's linear betas by 1000 / T (as improved-diffusion does) so that
    # x_T is still pure noise; the paper's 1e-4..0.02 at T=100 would leave 60% of the image in x_T.
    # Every preset has one GroupNorm group count that leaves at least 4 channels per group at each of
    # its widths, so its models export to diffusers' UNet2DModel (one norm_num_groups for all norms).
    "quick_test": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, emb_dim=128, norm_groups=8,
                       dropout=0.0, timesteps=100, beta_start=1e-3, beta_end=0.2, batch_size=64, learning_rate=1e-3,
                       warmup_steps=100, restart_period=4, epochs=5, train_subset=5000, ema_decay=0.995, log_every=10,
                       save_every=1),
    "cifar10": dict(),
    "cifar10_optimized": dict(base_channels=64, emb_dim=256, norm_groups=16, learning_rate=3e-4, epochs=300,
                              restart_period=50),
    # 800,000 steps of 128 (2,048 passes over CIFAR-10): 2,052 epochs of 390 whole batches, cut at max_steps.
    "ddpm_paper": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                       dropout=0.1, emb_dim=512, timesteps=1000, schedule_type="linear", beta_start=1e-4, beta_end=0.02,
                       learning_rate=2e-4, weight_decay=0.0, warmup_steps=5000, scheduler="constant", grad_clip=1.0,
                       ema_decay=0.9999, batch_size=128, epochs=2052, max_steps=800_000, save_every=25),
    "best_quality": dict(timesteps=2000, schedule_type="cosine", batch_size=256, learning_rate=2e-4,
                         emb_dim=256, epochs=800, restart_period=100),
    "fastest": dict(base_channels=64, channel_mults=(1, 2, 2), use_attention=False, emb_dim=256, norm_groups=16,
                    timesteps=500, beta_start=2e-4, beta_end=0.04, batch_size=256, learning_rate=5e-4, epochs=200, restart_period=25),
    "low_memory": dict(base_channels=64, emb_dim=256, norm_groups=16, batch_size=32, learning_rate=1e-4,
                       epochs=200, restart_period=25),
    "cifar10_cond": dict(base_channels=64, emb_dim=256, norm_groups=16, learning_rate=3e-4, epochs=300,
                         restart_period=50, class_conditional=True, class_dropout=0.1, guidance_scale=2.0),
    # One hour on a 2-core CPU is about 6,300 steps of 64: a 1.1M-parameter UNet at a constant high
    # LR with a short EMA, so the weights sampled at the end average the last few thousand steps.
    # Dynamic thresholding: a model this young predicts x_0 far out of range at high noise, and
    # clamping that seeds speckle (BENCHMARKS.md, "Dynamic thresholding"). Power-EMA snapshots (20 of
    # 4.4 MB in the hour) for --ema_length 0.05, which beat the 0.999 EMA on every run measured, and
    # for an early checkpoint's EMA as the autoguidance guide (BENCHMARKS.md, "Autoguidance").
    "cpu_hour": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, emb_dim=128, norm_groups=8,
                     dropout=0.0, batch_size=64, learning_rate=1e-3, warmup_steps=200, scheduler="constant",
                     grad_clip=1.0, ema_decay=0.999, ema_profiles=(0.05, 0.10), ema_snapshot_every=32_768,
                     epochs=10_000, max_minutes=60.0, val_size=0,
                     save_every=1, sample_every=2, preview_steps=20, log_every=20, clip_x0="dynamic"),
    # Not run yet (no GPU has trained it): what we would run on one H100 to reach FID < 10 within
    # 10 million training images. The paper's UNet at twice its batch and LR, constant after warmup
    # (at short budgets the LR's average matters more than its tail: BENCHMARKS.md, "Tuning
    # cpu_hour"), bf16 and torch.compile; the EMA chosen after training from power-EMA snapshots
    # (--ema_length), and an early checkpoint of the same run as the autoguidance guide.
    "gpu_speedrun": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.1, emb_dim=512, batch_size=256, learning_rate=4e-4, warmup_steps=1000,
                         scheduler="constant", grad_clip=1.0, ema_decay=0.9995, ema_profiles=(0.05, 0.10),
                         ema_snapshot_every=500_000, epochs=201, max_steps=39_063, compile=True, save_every=10,
                         sample_every=5, preview_steps=20, clip_x0="dynamic"),
}
for _overrides in PRESETS.values():
    Config(**_overrides)


# What each preset is for; preset_summary() adds its numbers, read from the preset itself.
PRESET_NOTES = {
    "quick_test": "tiny UNet: the whole pipeline on a CPU in minutes",
    "cifar10": "the paper's UNet with cosine warm restarts",
    "cifar10_optimized": "half-width UNet: the recommended start",
    "ddpm_paper": "Ho et al. 2020 exactly: Adam, warmup then constant LR, clip 1, EMA",
    "best_quality": "the paper's UNet with a narrower time embedding, cosine schedule",
    "fastest": "small UNet without attention",
    "low_memory": "half-width UNet at a small batch",
    "cifar10_cond": "cifar10_optimized with class labels: pick the class, guided previews",
    "cpu_hour": "small UNet for 60 minutes of a CPU: the best images an hour gives",
    "gpu_speedrun": "the paper's UNet for 10M images on one GPU, post-hoc EMA (not yet run on a GPU)",
}
DEFAULT_PRESET = "cifar10_optimized"


def preset_summary(name):
    """The menu's line for a preset: its note, then its size and recipe as the preset defines them."""
    cfg = preset_config(name, {})
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = count_parameters(build_model(cfg))
    length = f"{cfg.max_steps:,} steps" if cfg.max_steps else f"{cfg.epochs} epochs"
    images = f" of {cfg.train_subset:,} images" if cfg.train_subset else ""
    return (f"{PRESET_NOTES[name]} ({params / 1e6:.2f}M parameters, T={cfg.timesteps} {cfg.schedule_type}, "
            f"batch {cfg.batch_size}, lr {cfg.learning_rate:g}, {length}{images})")


def default_run_name(cfg):
    return f"{cfg.preset}_ts{cfg.timesteps}"


def schedule_warning(cfg):
    """A warning when x_T keeps a visible part of the image (sqrt(alpha_bar_T) above 2%): samplers
    start from pure noise, so such a schedule gives washed-out or noisy samples."""
    betas = make_beta_schedule(cfg.schedule_type, cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.cosine_s)
    signal = float(torch.cumprod(1 - betas, 0)[-1].sqrt())
    if signal <= 0.02:
        return None
    scale = 1000 / cfg.timesteps
    return (f"warning: with T={cfg.timesteps} and betas {cfg.beta_start:g}..{cfg.beta_end:g}, x_T keeps "
            f"{signal:.0%} of the image but sampling starts from pure noise; for T={cfg.timesteps} use "
            f"--beta_start {1e-4 * scale:g} --beta_end {min(0.02 * scale, 0.999):g} or --schedule_type cosine")


def validate_config(cfg):
    """Range-check every field before any work starts; raise UserError naming the flag."""
    levels = len(cfg.channel_mults) - 1
    checks = [
        (cfg.timesteps >= 2, "--timesteps must be at least 2"),
        (cfg.image_size >= 4, "--image_size must be at least 4"),
        (cfg.base_channels >= 1, "--base_channels must be positive"),
        (len(cfg.channel_mults) >= 1 and min(cfg.channel_mults) >= 1,
         "--channel_mults needs one or more positive integers, e.g. 1,2,2,2"),
        (cfg.num_res_blocks >= 1, "--num_res_blocks must be at least 1"),
        (0.0 <= cfg.dropout < 1.0, "--dropout must be in [0, 1)"),
        (cfg.emb_dim >= 1, "--emb_dim must be positive"),
        (cfg.norm_groups >= 1, "--norm_groups must be at least 1"),
        (cfg.norm_min_channels >= 1, "--norm_min_channels must be at least 1"),
        (0 <= cfg.class_dropout < 1, "--class_dropout must be in [0, 1)"),
        (cfg.guidance_scale >= 0, "--guidance_scale must be at least 0"),
        (0 <= cfg.guide_ema_length < MAX_SIGMA_REL, f"--guide_ema_length must be in [0, {MAX_SIGMA_REL:.4f})"),
        (cfg.guide or not cfg.guide_ema_length, "--guide_ema_length needs --guide"),
        (cfg.norm_eps > 0, "--norm_eps must be positive"),
        (cfg.cosine_s > 0, "--cosine_s must be positive"),
        (cfg.learning_rate > 0, f"--learning_rate must be positive (got {cfg.learning_rate:g})"),
        (cfg.weight_decay >= 0, "--weight_decay must be >= 0"),
        (cfg.warmup_steps >= 0, "--warmup_steps must be >= 0"),
        (cfg.restart_period >= 1, "--restart_period must be at least 1 epoch"),
        (cfg.restart_mult >= 1, "--restart_mult must be at least 1"),
        (0 <= cfg.min_lr < cfg.learning_rate, "--min_lr must be >= 0 and below --learning_rate"),
        (cfg.cosine_until >= 0, "--cosine_until must be >= 0 (0 = the run's last step)"),
        (cfg.cosine_until == 0 or cfg.scheduler == "cosine", "--cosine_until needs --scheduler cosine"),
        (cfg.cosine_until == 0 or cfg.cosine_until > cfg.warmup_steps,
         f"--cosine_until must be after the --warmup_steps {cfg.warmup_steps} (or 0)"),
        (cfg.step_size >= 1, "--step_size must be at least 1 epoch"),
        (0 < cfg.gamma <= 1, f"--gamma must be in (0, 1] (got {cfg.gamma:g}); 0.1 divides the LR by 10"),
        (cfg.grad_clip >= 0, "--grad_clip must be >= 0 (0 turns clipping off)"),
        (0.0 <= cfg.ema_decay < 1.0, "--ema_decay must be in [0, 1)"),
        (all(0 < s < MAX_SIGMA_REL for s in cfg.ema_profiles) and len(set(cfg.ema_profiles)) == len(cfg.ema_profiles),
         f"--ema_profiles takes distinct lengths sigma_rel in (0, {MAX_SIGMA_REL:.4f}), e.g. 0.05,0.10"),
        (cfg.ema_snapshot_every >= 0, "--ema_snapshot_every must be >= 0 images"),
        (not cfg.ema_profiles or cfg.ema_snapshot_every > 0,
         "--ema_profiles needs --ema_snapshot_every IMAGES, how often to save them (e.g. 50000, an epoch of CIFAR-10)"),
        (cfg.batch_size >= 1, "--batch_size must be at least 1"),
        (cfg.grad_accum >= 1 and cfg.batch_size % cfg.grad_accum == 0,
         f"--grad_accum must divide --batch_size {cfg.batch_size} into equal micro-batches (got {cfg.grad_accum})"),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.max_steps >= 0, "--max_steps must be >= 0 (0 = no limit)"),
        (cfg.max_minutes >= 0, "--max_minutes must be >= 0 (0 = no limit)"),
        (cfg.seed >= 0, "--seed must be >= 0"),
        (cfg.num_workers >= 0, "--num_workers must be >= 0"),
        (cfg.train_subset >= 0, "--train_subset must be >= 0 (0 = all images)"),
        (cfg.val_size >= 0, "--val_size must be >= 0 (0 = no validation)"),
        (cfg.patience >= 1, "--patience must be at least 1 epoch"),
        (not (cfg.early_stopping and cfg.val_size == 0 and cfg.fid_every == 0),
         "--early_stopping needs something to watch: --val_size > 0 or --fid_every > 0"),
        (cfg.fid_every >= 0, "--fid_every must be >= 0 (0 = no FID during training)"),
        (cfg.fid_samples >= 2, "--fid_samples must be at least 2"),
        (cfg.log_every >= 1, "--log_every must be at least 1"),
        (bool(cfg.wandb_project.strip()), "--wandb_project needs a name"),
        (cfg.sample_every >= 0, "--sample_every must be >= 0 (0 = no previews)"),
        (cfg.num_preview >= 1, "--num_preview must be at least 1"),
        (1 <= cfg.preview_steps <= cfg.timesteps, f"--preview_steps must be in 1..{cfg.timesteps} (the timesteps)"),
        (cfg.save_every >= 1, "--save_every must be at least 1"),
        (cfg.save_every_steps >= 0, "--save_every_steps must be >= 0 (0 = off)"),
        (cfg.save_every_minutes >= 0, "--save_every_minutes must be >= 0 (0 = off)"),
        (cfg.max_bad_steps >= 1, "--max_bad_steps must be at least 1"),
        (cfg.keep_last >= 0, "--keep_last must be >= 0 (0 = keep all)"),
        (cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}"),
        ("/" not in cfg.run_name and cfg.run_name not in (".", ".."), "--run_name must be a plain name, not a path"),
        (cfg.schedule_type != "linear" or 0 < cfg.beta_start < cfg.beta_end < 1,
         f"need 0 < --beta_start < --beta_end < 1 (got {cfg.beta_start:g} and {cfg.beta_end:g})"),
        (cfg.image_size % 2 ** levels == 0, f"--image_size {cfg.image_size} must be a multiple of {2 ** levels} "
                                            f"for {len(cfg.channel_mults)} resolution levels"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# --- Data: CIFAR-10 pickles or an image folder, held as one uint8 tensor -------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_BATCH = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles: allow the few numpy classes they hold and nothing that runs code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def load_cifar10_train(data_dir, with_labels=False):
    """The 50,000 CIFAR-10 training images as uint8 (N, 3, 32, 32), downloading them if missing;
    with_labels: also their int64 labels (N,), indices into CIFAR10_CLASSES."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    if not all((folder / name).is_file() for name in CIFAR10_TRAIN_BATCHES):
        download_cifar10(data_dir)
    return read_cifar10_batches(folder, CIFAR10_TRAIN_BATCHES, with_labels)


def read_cifar10_batches(folder, names, with_labels=False):
    """CIFAR-10 pickle batches as one uint8 array (N, 3, 32, 32) (and the int64 labels (N,))."""
    batches, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as f:
                batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            batches.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64) if with_labels else None)
        except Exception as e:
            raise UserError(f"{folder / name} is not a readable CIFAR-10 batch ({e}); delete "
                            f"{folder} and run again to download it afresh") from None
    images = np.concatenate(batches)
    return (images, np.concatenate(labels)) if with_labels else images


def download_cifar10(data_dir):
    # torchvision checks the archive's md5; our own reader above then loads the pickles.
    import torchvision
    try:
        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}); get "
                        f"{CIFAR10_URL} and extract it into {data_dir} so that "
                        f"{Path(data_dir) / 'cifar-10-batches-py' / 'data_batch_1'} exists, "
                        f"or train on your own images with --dataset folder --data_dir DIR") from None


def subset_indices(total, subset, seed):
    """A fixed random choice of `subset` of `total` items (all when subset is 0), in order."""
    if not subset or subset >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=subset, replace=False))


def folder_classes(root, paths):
    """Class labels from the first-level subfolders (root/<class>/..., torchvision's ImageFolder
    convention): (int64 labels (N,), the sorted class names)."""
    parts = [p.relative_to(root).parts for p in paths]
    loose = next((p for p, part in zip(paths, parts) if len(part) == 1), None)
    if loose is not None:
        raise UserError(f"--class_conditional needs every image in a class subfolder of {root}, but {loose} "
                        f"is not; move it into <class>/ or remove it")
    names = sorted({part[0] for part in parts})
    if len(names) < 2:
        raise UserError(f"--class_conditional needs at least 2 class subfolders in {root}, found {len(names)}")
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[part[0]] for part in parts], dtype=np.int64), names


def load_image_folder(data_dir, image_size, num_workers, subset=0, seed=0, val_size=0, with_labels=False):
    """Every .png/.jpg/.jpeg under data_dir (recursively) as RGB uint8 (N, 3, S, S): resized so the
    short side is S, then center-cropped, and decoded once so training never waits on files.
    Returns (train, val): val is a fixed random min(val_size, N // 10) of the images, held out;
    train is the rest, or a fixed random `subset` of it. with_labels: (train, val, the training
    images' class labels, the class names), classes from folder_classes."""
    from PIL import Image, ImageOps
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a folder; point it at a folder of .png/.jpg images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no .png/.jpg/.jpeg images under {data_dir}")
    n_val = min(val_size, len(paths) // 10)
    held_out = set(subset_indices(len(paths), n_val, seed + 1).tolist()) if n_val else set()
    labels, names = folder_classes(root, paths) if with_labels else (None, None)
    val_paths = [p for i, p in enumerate(paths) if i in held_out]
    keep = [i for i in range(len(paths)) if i not in held_out]
    keep = [keep[i] for i in subset_indices(len(keep), subset, seed)]
    paths = [paths[i] for i in keep]

    def decode(path):
        try:
            with Image.open(path) as img:
                img = ImageOps.fit(img.convert("RGB"), (image_size, image_size), Image.BICUBIC)
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        except Exception as e:
            raise UserError(f"cannot read image {path} ({e}); remove it or fix it") from None

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        images = list(tqdm(pool.map(decode, paths + val_paths), total=len(paths) + len(val_paths),
                           desc="decoding images", unit="img", leave=False, disable=len(paths) < 1000))
    train, val = np.stack(images[:len(paths)]), (np.stack(images[len(paths):]) if val_paths else None)
    return (train, val, labels[keep], names) if with_labels else (train, val)


class TrainingData(NamedTuple):
    images: torch.Tensor             # uint8 (N, 3, S, S)
    val: Optional[torch.Tensor]      # uint8 validation images, or None
    labels: Optional[torch.Tensor]   # int64 (N,) class labels of a class-conditional run, else None
    class_names: tuple               # the names of the classes (empty when unconditional)


def load_dataset(cfg):
    """The training and validation images as uint8 tensors (N, 3, S, S), and the training images'
    classes when cfg.class_conditional. Validation is None when there is none (--val_size 0, or no
    CIFAR-10 test batch)."""
    labels, names = None, ()
    if cfg.dataset == "cifar10":
        if cfg.image_size != 32:
            raise UserError("CIFAR-10 images are 32x32: drop --image_size or use --dataset folder")
        images, labels = load_cifar10_train(cfg.data_dir, with_labels=True)
        keep = subset_indices(len(images), cfg.train_subset, cfg.seed)
        images, labels, names = images[keep], labels[keep], CIFAR10_CLASSES
        val = None
        test_batch = Path(cfg.data_dir) / "cifar-10-batches-py" / CIFAR10_TEST_BATCH
        if cfg.val_size and test_batch.is_file():
            val = read_cifar10_batches(test_batch.parent, [CIFAR10_TEST_BATCH])[:cfg.val_size]
        elif cfg.val_size:
            print(f"no {test_batch}: training without a validation loss")
    else:
        images, val, *classes = load_image_folder(cfg.data_dir, cfg.image_size, cfg.num_workers, cfg.train_subset,
                                                  cfg.seed, cfg.val_size, with_labels=cfg.class_conditional)
        labels, names = classes or (None, ())
    if not cfg.class_conditional:
        labels, names = None, ()
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return TrainingData(as_tensor(images), as_tensor(val), as_tensor(labels), tuple(names))


def epoch_batches(images, batch_size, epoch, seed, flip, start_batch=0, shard=slice(None), labels=None):
    """Yield the batches of one epoch: (float images in [-1, 1], (B, 3, S, S), on images' device;
    their labels (B,) when labels are given, else None).

    The order and the flips are a pure function of (seed, epoch), so a resumed run sees exactly the
    batches it would have seen; start_batch skips the ones already trained on. shard picks this
    process's part of each batch when several processes train together."""
    n = len(images)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).to(images.device)
    flips = (torch.rand(n, generator=g) < 0.5).to(images.device)
    for i in range(start_batch, steps_per_epoch(n, batch_size)):
        idx = order[i * batch_size:(i + 1) * batch_size][shard]
        x = images[idx].float() / 127.5 - 1.0
        if flip:
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
        yield x, (None if labels is None else labels[idx])


def planned_steps(cfg, n_batches):
    return cfg.epochs * n_batches if cfg.max_steps == 0 else min(cfg.epochs * n_batches, cfg.max_steps)


def steps_per_epoch(num_images, batch_size):
    # Drop the last partial batch so every step sees the same batch size, as the paper's input pipeline.
    return max(1, num_images // batch_size)


# --- Model: timestep embedding, ResBlock, AttnBlock, UNet (Ho et al. 2020) -----------------------

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps, as in Ho et al.'s code: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


@dataclass(frozen=True)
class Norm:
    """The UNet's GroupNorm, epsilon 1e-6 as in the paper's TensorFlow code. Its group count is the
    largest divisor of gcd(groups, width) that leaves at least `min_channels` channels per group.

    Why the minimum: a ResBlock adds the timestep embedding as one constant per channel, just before
    a GroupNorm. A group of one channel subtracts exactly that constant again, so a block of such
    norms cannot see t, and a network made only of them predicts the same noise at every noise
    level. The paper's 32 groups at 128 channels hold 4 channels each (unchanged by the default);
    32 groups at a 32-wide level would be instance norm."""
    groups: int = 32
    eps: float = 1e-6
    min_channels: int = 4

    def group_count(self, channels):
        common = math.gcd(self.groups, channels)
        return max((g for g in range(1, common + 1) if common % g == 0 and channels // g >= self.min_channels),
                   default=1)

    def __call__(self, channels):
        return nn.GroupNorm(self.group_count(channels), channels, eps=self.eps)


def zero_init(module):
    # The paper's code starts each residual branch and the output at zero (init_scale=0), so the
    # untrained network is the identity map plus a zero prediction.
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    module.zero_init = True  # UNet._init_weights leaves it so
    return module


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels, norm=Norm()):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        # The 1x1 convolutions are applied as matmuls over the pixels, (B, HW, C) @ W^T: the same
        # weights and math, but q, k, v come out contiguous, as (B, 1 head, HW, C), which lets
        # scaled_dot_product_attention pick its fused flash kernel instead of its unfused math.
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = F.linear(h, self.qkv.weight.reshape(3 * C, C), self.qkv.bias).unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v, (B, HW, C)
        h = F.linear(h, self.proj.weight.reshape(C, C), self.proj.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, optional attention after."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attn=False, norm=Norm()):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, norm) if attn else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. "same" pads one row and column at the bottom and right only, as the paper's
    TensorFlow 'SAME' padding does for even sizes; "symmetric" pads every side (PyTorch's habit)."""

    def __init__(self, channels, padding="same"):
        super().__init__()
        self.asymmetric = padding == "same"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x, emb):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """The DDPM noise predictor eps_theta(x_t, t): (B, C, S, S), (B,) int64 -> (B, C, S, S).

    With the defaults (128 channels, mults 1-2-2-2, 2 blocks, attention at 16x16, GroupNorm of 32
    groups with eps 1e-6, 'SAME'-padded downsampling) it is the 35.7M-parameter CIFAR-10 model of
    Ho et al. 2020, the function diffusers' UNet2DModel computes for google/ddpm-cifar10-32."""

    def __init__(self, cfg=None, num_classes=0, in_channels=3):
        super().__init__()
        cfg = cfg or Config()  # the model fields: image_size, base_channels ... downsample_padding
        base_channels, channel_mults, emb_dim, dropout = cfg.base_channels, cfg.channel_mults, cfg.emb_dim, cfg.dropout
        self.base_channels, self.num_classes = base_channels, num_classes
        self.grad_checkpointing = False  # how it trains, not what it is: set by build_model, not saved
        norm = Norm(cfg.norm_groups, cfg.norm_eps, cfg.norm_min_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes:
            # A learned vector per class added to the timestep embedding (as improved-diffusion and
            # EDM do), and one more row, index num_classes, for "no class": label -1.
            self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.head = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        attn_at = set(cfg.attn_resolutions) if cfg.use_attention else set()

        self.down, skip_channels = nn.ModuleList(), [base_channels]
        ch, res = base_channels, cfg.image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout, res in attn_at, norm))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(ch, cfg.downsample_padding))
                res //= 2
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, cfg.use_attention, norm),
                                  ResBlock(ch, ch, emb_dim, dropout, norm=norm)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout,
                                        res in attn_at, norm))
                ch = base_channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, in_channels, 3, padding=1)))
        self._init_weights()

    def _init_weights(self):
        # Ho et al. use variance_scaling(fan_avg, uniform) = Xavier-uniform, zero biases; the
        # zero-initialised layers were set in their constructors and are skipped here.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not getattr(m, "zero_init", False):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None):
        """y: (B,) int64 class labels of a class-conditional UNet, -1 (or None for all) = no class."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.num_classes:
            if y is None:
                y = torch.full_like(t, -1)
            emb = emb + self.class_emb(torch.where(y < 0, self.num_classes, y))
        elif y is not None:
            raise ValueError("class labels given to an unconditional UNet")
        h = self.head(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.out(h)

    def _run(self, block, h, emb):
        """A block, or with grad_checkpointing (while training) a ResBlock whose activations, its
        attention's included, are recomputed in the backward pass instead of kept: only its input is
        stored. Non-reentrant checkpointing replays the dropout masks of the forward pass."""
        if self.grad_checkpointing and isinstance(block, ResBlock) and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)


def build_model(cfg, num_classes=0):
    """The UNet of cfg; num_classes > 0 (a class-conditional run's classes) adds the class embedding."""
    model = UNet(cfg, num_classes if cfg.class_conditional else 0)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --- Hardware: devices, mixed precision, memory layout, fast math, several processes -------------

# The UNet runs under autocast (bf16, or fp16 with a GradScaler) where that is faster; everything
# around it (schedules, q_sample, posteriors, samplers, the loss) stays in fp32/fp64. Several GPUs
# (or CPU processes) run under torchrun with DistributedDataParallel: every rank draws the same
# timesteps and noise for the whole global batch and keeps its own slice, so N processes train as
# one process with the same global batch would, up to float rounding.

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX, where bf16 convolutions beat fp32 (read from /proc/cpuinfo; Linux only)."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def autocast_dtype(amp, device):
    """The dtype the UNet computes in for --amp (None: fp32). auto is bf16 where the hardware runs
    it natively (GPUs since Ampere, CPUs with AVX512-BF16/AMX) and fp32 elsewhere."""
    if amp == "auto":
        # is_bf16_supported() also says yes where bf16 is only emulated (V100, T4): ask for Ampere.
        native = torch.cuda.get_device_capability(device) >= (8, 0) if device.type == "cuda" else cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def precision_name(dtype):
    """fp32, bf16 or fp16: what the UNet computes in under autocast dtype (None: no autocast)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def use_channels_last(setting, device):
    # auto: channels-last suits cuDNN's tensor-core convolutions; on CPU (oneDNN) we measured no gain
    # in fp32 and a slowdown under bf16, so CPUs keep NCHW unless asked.
    return device.type == "cuda" if setting == "auto" else setting == "true"


def place_model(model, device, channels_last):
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Precision(nn.Module):
    """Calls the UNet in the chosen memory layout and autocast dtype and returns fp32, so the
    diffusion math around it never sees reduced precision."""

    def __init__(self, net, device, dtype=None, channels_last=False):
        super().__init__()
        self.net, self.device_type, self.dtype, self.channels_last = net, device.type, dtype, channels_last
        self.train(net.training)  # samplers switch dropout off through the wrapper and back

    def forward(self, x, t, y=None):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = () if y is None else (y,)  # an unconditional UNet is called exactly as before
        with contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype):
            return self.net(x, t, *labels).float()

    def no_sync(self):
        """DDP's no_sync (gradients stay local until a later backward) when the UNet runs under DDP."""
        net = getattr(self.net, "_orig_mod", self.net)  # torch.compile wraps the DDP module
        return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


def compile_model(net, cfg, world):
    """torch.compile outside DDP, so that dynamo's DDP optimizer can overlap gradient buckets with the
    backward. That optimizer splits the graph at bucket boundaries, which the activation checkpoint's
    higher-order op does not survive (pytorch/pytorch#104674): with --grad_checkpointing on several
    processes, compile the whole graph instead (gradients are then all-reduced after the backward)."""
    if world > 1 and cfg.grad_checkpointing:
        torch._dynamo.config.optimize_ddp = False
    return torch.compile(net)


def set_tf32(tf32):
    """TF32 in fp32 matmuls and convolutions, on or off, through the API the running torch has:
    fp32_precision from torch 2.9, which deprecates the allow_tf32 flags and raises where the two
    are mixed."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def set_fast_math(tf32):
    set_tf32(tf32)
    torch.backends.cudnn.benchmark = True  # shapes never change: pick the fastest convolutions once


def derived_seed(*keys):
    """A seed that is a pure function of non-negative integer keys, e.g. (seed, step, stream): the
    randomness of every step and every sample batch is fixed by them, so a resumed run draws what
    an uninterrupted one would, and ranks agree (or differ) exactly where they should."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


# Streams of derived_seed: what a draw is for.
BATCH_NOISE, DROPOUT, SAMPLE_BATCH, LABEL_DROP = 0, 1, 2, 3


@dataclass(frozen=True)
class Processes:
    """This process among the torchrun workers (rank 0 of 1 without torchrun). The collectives
    are no-ops in a single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def shard(self, n):
        """This rank's contiguous slice of n items."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def sum_(self, tensor):
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any(self, flag, device):
        """True on every rank when flag is true on any rank (e.g. rank 0 decided to stop)."""
        return bool(self.sum_(torch.tensor([int(flag)], device=device)).item()) if self.world > 1 else flag

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        out = [obj] * self.world
        if self.world > 1:
            torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def torchrun_processes():
    return Processes(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))


def init_processes(device_name):
    """(device, Processes) for this process: under torchrun it joins the process group (NCCL on
    GPUs, gloo on CPU) and takes GPU number LOCAL_RANK."""
    procs, device = torchrun_processes(), pick_device(device_name)
    if procs.world == 1:
        return device, procs
    if device.type == "cuda":
        if procs.local_rank >= torch.cuda.device_count():
            raise UserError(f"{procs.world} processes but only {torch.cuda.device_count()} GPUs on this machine")
        torch.cuda.set_device(procs.local_rank)
        device = torch.device("cuda", procs.local_rank)
    if not torch.distributed.is_initialized():
        import datetime  # rank 0's FID or previews may keep the others waiting for minutes
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=60))
    return device, procs


# --- Diffusion: beta schedules and GaussianDiffusion (q, posterior, loss) -------------------------

def make_beta_schedule(kind, timesteps, beta_start=1e-4, beta_end=0.02, cosine_s=0.008):
    """Betas as a float64 tensor [T].

    linear: evenly spaced from beta_start to beta_end (Ho et al. 2020).
    cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2, and
            beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; choose from linear, cosine")


def _host_table(values):
    """A schedule table (CPU tensor, array or list) as a numpy float64 array on the host."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def _extract(buffer, t, x):
    """buffer[t] cast to x's dtype and shaped (B, 1, 1, 1) to broadcast against x."""
    return buffer[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion(nn.Module):
    """The forward process q and the quantities the samplers need, in the names of improved-diffusion.

    `t` is an int64 tensor of indices in [0, T); t = 0 is the first noising step, so x_t at t = 0
    is the least noisy latent. Buffers are float64 and cast to the data's dtype when used."""

    def __init__(self, betas, device=None):
        """betas: the schedule's host table (a CPU tensor, array or list); every derived table is
        computed from it on the host in float64, then made on `device` (default: where betas are),
        so no table is ever built from a CPU and a CUDA part."""
        super().__init__()
        if device is None:
            device = betas.device if isinstance(betas, torch.Tensor) else "cpu"
        betas = _host_table(betas)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be in (0, 1]"
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        self.alphas_cumprod_host = alphas_cumprod  # numpy float64 [T]: what samplers read on the host
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; like Ho et al., log it with the value at t = 1 there.
        first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        for name, value in dict(
            betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
            # q(x_t | x_0)
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            # posterior q(x_{t-1} | x_t, x_0)
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.concatenate([first, posterior_variance[1:]])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            # reverse-process variance sigma_t^2 = beta_t ("fixedlarge", the paper's CIFAR-10 choice)
            log_betas_fixedlarge=np.log(np.concatenate([first, betas[1:]])),
        ).items():
            self.register_buffer(name, torch.from_numpy(value).to(device))

    def q_sample(self, x_start, t, noise):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. eq. 4)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, eps, x_t, t, clip_x0="static", var_type="fixedlarge"):
        """Mean and log-variance of p(x_{t-1} | x_t) from a noise prediction (Ho et al. sec. 3.2), and
        the predicted x_0 they come from, held by the clip_x0 rule (see clip_xstart)."""
        pred_xstart = clip_xstart(self.predict_xstart_from_eps(x_t, t, eps), clip_x0)
        mean, _, log_variance = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        if var_type == "fixedlarge":
            log_variance = _extract(self.log_betas_fixedlarge, t, x_t)
        return mean, log_variance, pred_xstart

    def loss(self, model, x_start, t=None, noise=None):
        """L_simple (Ho et al. Algorithm 1, eq. 14): the MSE between the noise and its prediction."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        return self.training_losses(model, x_start, t, noise).mean()

    def training_losses(self, model, x_start, t, noise=None, y=None):
        """The per-image L_simple terms, (B,): mean squared error of the noise prediction at t
        (of class y, -1 = no class, for a class-conditional model)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        labels = () if y is None else (y,)
        return (model(self.q_sample(x_start, t, noise), t, *labels) - noise).square().mean(dim=(1, 2, 3))

    def respace(self, timesteps):
        """The Markov chain that visits only `timesteps` (increasing): betas recomputed from alpha_bar
        so that it has the same marginals q(x_t | x_0) there (improved-diffusion's respacing)."""
        if len(timesteps) == self.num_timesteps:
            return self
        alphas_cumprod = self.alphas_cumprod_host[np.asarray(timesteps, dtype=np.int64)]  # host table
        prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        return GaussianDiffusion(1.0 - alphas_cumprod / prev, device=self.betas.device)

    def sample(self, model, shape, spec=None, *, noise=None, generator=None, classes=None, guide=None,
               callback=None):
        """Images (B, C, H, W) drawn as the SamplingSpec says (default: ancestral over all T steps),
        starting from `noise` or from randn(shape) of `generator`; in [-1, 1] unless spec.clip_x0 is
        "none". `model(x_t, t)` predicts the noise; with `classes` ((B,) int64 labels, -1 = no class)
        it is called as model(x_t, t, y). spec.guidance_scale guides it by `guide` (autoguidance, the
        spec naming the guide) or, without one, by its own unconditional prediction (classifier-free
        guidance, with classes): the one place guidance is applied. callback(step, t, x_t, x0) sees
        each model call (see the samplers)."""
        spec = spec or SamplingSpec()
        if bool(spec.guide) != (guide is not None):
            raise ValueError("a guide model goes with a spec that names it (SamplingSpec.guide), and only then")
        predictor = (autoguided_noise_predictor(model, guide, classes, spec.guidance_scale) if guide is not None
                     else model if classes is None else guided_noise_predictor(model, classes, spec.guidance_scale))
        device = self.betas.device
        x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
        was_training = getattr(model, "training", False)
        if was_training:
            model.eval()  # dropout off while sampling
        try:
            return SAMPLERS[spec.sampler](predictor, self, x, spec.timesteps(self), spec, generator, callback)
        finally:
            if was_training:
                model.train()


def build_diffusion(cfg):
    return GaussianDiffusion(make_beta_schedule(cfg.schedule_type, cfg.timesteps, cfg.beta_start,
                                                cfg.beta_end, cfg.cosine_s))


def guided_noise_predictor(model, classes, scale):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond),
    so w = 1 samples the class-conditional model, w = 0 the unconditional one, and w > 1 moves
    samples further towards what distinguishes the class. Both predictions come from one call on
    the doubled batch; rows labelled -1 are unconditional either way."""
    classes = torch.as_tensor(classes, dtype=torch.long)
    if scale == 1:
        return lambda x, t: model(x, t, classes.to(x.device))
    if scale == 0:
        return lambda x, t: model(x, t, torch.full_like(classes, -1).to(x.device))

    def predict(x, t):
        y = classes.to(x.device)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]))
        eps_cond, eps_uncond = both.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return predict


def autoguided_noise_predictor(model, guide, classes, scale):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    eps = eps_guide + w (eps_main - eps_guide), the guide a weaker model of the same task (smaller,
    or trained for less). The same as their D_guide + w (D_main - D_guide), as the denoiser is affine
    in eps with the same coefficients for both. A class-conditional pair both get the labels; w = 1
    is the main model alone."""
    labels = (lambda x: ()) if classes is None else (lambda x: (torch.as_tensor(classes).to(x.device),))
    if scale == 1:
        return lambda x, t: model(x, t, *labels(x))

    def predict(x, t):
        eps_main, eps_guide = model(x, t, *labels(x)), guide(x, t, *labels(x))
        return eps_guide + scale * (eps_main - eps_guide)
    return predict


# --- Samplers: one SamplingSpec; DDPM ancestral, DDIM, DPM-Solver++(2M) --------------------------

TIMESTEP_SPACINGS = ("uniform", "quadratic", "trailing", "logsnr")


def timestep_grid(num_timesteps, steps, spacing="uniform", alphas_cumprod=None):
    """`steps` distinct timesteps of [0, T - 1] as Python ints, increasing, always ending at T - 1.
    Computed on the host in float64 (the samplers read them without touching the device).

    uniform:   evenly spread, both ends included.
    quadratic: t = (T - 1) (i / (K - 1))^2, denser near the data where fine detail forms
               (the spirit of DDIM's "quad" skip), both ends included.
    trailing:  T - 1, T - 1 - T/K, ... (Lin et al. 2024): starts at the last step, ends at T/K - 1.
    logsnr:    evenly spread in lambda = log(alpha_bar / (1 - alpha_bar)) from t = 0 to t = T - 1
               (DPM-Solver's "logSNR" steps; needs alphas_cumprod), or to T - 2 when the last step
               alone drops lambda by more than the spacing (see _logsnr_grid_end)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_timesteps}, got {steps}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {', '.join(TIMESTEP_SPACINGS)}")
    if spacing == "logsnr" and alphas_cumprod is None:
        raise ValueError("logsnr spacing needs the schedule's alphas_cumprod")
    last = num_timesteps - 1
    if steps == 1:
        return [last]
    fraction = np.linspace(0, 1, steps)
    if spacing == "trailing":
        return np.round(last - np.arange(steps - 1, -1, -1) * num_timesteps / steps).astype(np.int64).tolist()
    if spacing == "uniform":
        points = fraction * last
    elif spacing == "quadratic":
        points = fraction ** 2 * last
    else:
        alphas_cumprod = _host_table(alphas_cumprod)
        log_snr = np.log(alphas_cumprod / (1 - alphas_cumprod))  # decreasing in t
        lowest = log_snr[_logsnr_grid_end(log_snr, steps)]
        targets = log_snr[0] + fraction * (lowest - log_snr[0])
        points = np.abs(log_snr[None, :] - targets[:, None]).argmin(axis=1)  # nearest step
    return _distinct_increasing(np.round(points).astype(np.int64).tolist(), last)


def strided_timesteps(num_timesteps, steps, spacing="uniform", alphas_cumprod=None):
    """timestep_grid as a CPU int64 tensor, to index the schedule's tables with."""
    return torch.tensor(timestep_grid(num_timesteps, steps, spacing, alphas_cumprod), dtype=torch.long)


def _logsnr_grid_end(log_snr, steps):
    """The step whose lambda the logsnr grid ends at: T - 1, or T - 2 when the last step's drop in
    lambda is wider than the grid spacing. No timestep lies inside that drop, so the sampler crosses
    it in one step whatever the grid; points placed in it would all round to T - 1 and, pushed apart,
    crowd the steps before it (the cosine schedule's beta capped at 0.999 drops lambda by 6.9 in its
    last step: 7 of 20 steps landed on t = 993..999, where x_t is pure noise). Sampling still starts
    at T - 1. Schedules without such a drop, like the paper's linear one, keep their grid."""
    last = len(log_snr) - 1
    if last > 0 and log_snr[last - 1] - log_snr[last] > (log_snr[0] - log_snr[last]) / (steps - 1):
        return last - 1
    return last


def _distinct_increasing(timesteps, last):
    """Where a grid rounds several points to one step, push them apart by one step each, keeping
    the first at or above 0 and the last at T - 1."""
    for i in range(1, len(timesteps)):
        timesteps[i] = max(timesteps[i], timesteps[i - 1] + 1)
    timesteps[-1] = last
    for i in range(len(timesteps) - 2, -1, -1):
        timesteps[i] = min(timesteps[i], timesteps[i + 1] - 1)
    return timesteps


DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp2m": "logsnr"}

CLIP_MODES = CONFIG_FIELDS["clip_x0"].metadata["choices"]
DYNAMIC_PERCENTILE = 0.995  # DPM-Solver++'s and diffusers' choice (Imagen leaves it open)
VAR_TYPES = ("fixedlarge", "fixedsmall")


@dataclass(frozen=True)
class SamplingSpec:
    """How samples are drawn, as one value: built once from the flags (--mode sample, eval) or from
    a run's config (previews, FID during training), handed whole to GaussianDiffusion.sample, and
    named by name() in file names (SamplingJob.fid_info names it in FID logs)."""
    sampler: str = "ddpm"          # ddpm: ancestral (Ho et al.); ddim (Song et al.); dpmpp2m: DPM-Solver++(2M)
    steps: int = 0                 # model calls, K of the T steps; 0 = all T
    spacing: str = ""              # which K steps (see timestep_grid); "" = the sampler's DEFAULT_SPACING
    eta: float = 0.0               # DDIM's noise: 0 deterministic, 1 the DDPM posterior's variance
    var_type: str = "fixedlarge"   # DDPM's reverse variance: beta_t (fixedlarge) or the posterior's (fixedsmall)
    clip_x0: str = "static"        # how each step's predicted x_0 is held in [-1, 1] (see clip_xstart)
    guidance_scale: float = 1.0    # guidance w: autoguidance with a guide, else classifier-free (with classes)
    guide: str = ""                # autoguidance's guide, by name (the model goes to sample(guide=...))

    def __post_init__(self):
        for name, value, allowed in (("sampler", self.sampler, tuple(SAMPLERS)),
                                     ("timestep spacing", self.spacing, ("",) + TIMESTEP_SPACINGS),
                                     ("var_type", self.var_type, VAR_TYPES), ("clip_x0", self.clip_x0, CLIP_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(filter(None, allowed))}")
        if self.eta < 0 or self.guidance_scale < 0:
            raise ValueError(f"eta and the guidance scale must be at least 0, got {self.eta} and {self.guidance_scale}")

    @property
    def grid_spacing(self):
        return self.spacing or DEFAULT_SPACING[self.sampler]

    def timesteps(self, diffusion):
        """The increasing timesteps the sampler visits, as host ints."""
        T = diffusion.num_timesteps
        return timestep_grid(T, self.steps or T, self.grid_spacing, diffusion.alphas_cumprod_host)

    def name(self, classes=""):
        """For file names: sampler and steps, DDIM's eta or DDPM's variance, the spacing when chosen,
        the clip rule unless static, the classes drawn and the guide, with w."""
        name = f"{self.sampler}{self.steps}" + {"ddim": f"_eta{self.eta:g}", "ddpm": f"_{self.var_type}",
                                                "dpmpp2m": ""}[self.sampler]
        name += f"_{self.spacing}" if self.spacing else ""
        name += f"_clip{self.clip_x0}" if self.clip_x0 != "static" else ""
        name += f"_{classes}" if classes else ""
        name += f"_guide-{self.guide}" if self.guide else ""
        return name + (f"_w{self.guidance_scale:g}" if classes or self.guide else "")


def clip_xstart(pred_xstart, clip):
    """The predicted x_0, held to the data's range [-1, 1] before a sampler uses it.

    static:  clamp every value (Ho et al.).
    dynamic: Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): s is a high percentile
             of |x_0| over each image (the 99.5th), at least 1; clamp to [-s, s] and divide by s.
             At high noise an eps error is multiplied by sigma_t / alpha_t (157 at t = T - 1 of the
             linear schedule) in x_0; clamping turns that into values at +-1, pixel by pixel, which
             the next steps read as texture and keep; dividing by s shrinks the whole unsure
             prediction towards grey instead.
             Where the prediction is within [-1, 1] both are the identity.
    none:    as predicted."""
    if clip not in CLIP_MODES:
        raise ValueError(f"unknown clip_x0 {clip!r}; choose from {', '.join(CLIP_MODES)}")
    if clip == "static":
        return pred_xstart.clamp(-1, 1)
    if clip == "dynamic":
        magnitude = pred_xstart.abs().flatten(1)
        magnitude = magnitude.to(torch.promote_types(magnitude.dtype, torch.float32))  # quantile: no bf16
        per_call = max(1, 2 ** 24 // magnitude.shape[1])  # torch.quantile takes at most 2^24 values at once
        s = torch.cat([torch.quantile(part, DYNAMIC_PERCENTILE, dim=1) for part in magnitude.split(per_call)])
        s = s.clamp(min=1).to(pred_xstart.dtype).view(-1, *([1] * (pred_xstart.dim() - 1)))
        return pred_xstart.clamp(-s, s) / s
    return pred_xstart


def xstart_from_eps(x_t, eps, alpha_bar):
    """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), with alpha_bar a host float."""
    return (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)


# Every sampler is sampler(model, diffusion, x_T, timesteps, spec, generator, callback): it runs
# model(x_t, t) once per timestep of the increasing grid, from the last down, and returns x_0.
# After each call it calls callback(step, t, x_t, x0) if given, with step = 0, 1, ... and x0 the
# predicted x_0 as the sampler uses it (after spec.clip_x0).

@torch.no_grad()
def ddpm_sample(model, diffusion, x, timesteps, spec, generator=None, callback=None):
    """Ancestral sampling, Ho et al. 2020 Algorithm 2; with steps < T, on the respaced chain."""
    chain = diffusion.respace(timesteps)
    for i in reversed(range(len(timesteps))):
        t_chain = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        t_model = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        mean, log_variance, x0 = chain.p_mean_variance(model(x, t_model), x, t_chain, spec.clip_x0, spec.var_type)
        if callback:
            callback(len(timesteps) - 1 - i, timesteps[i], x, x0)
        if i > 0:
            x = mean + (0.5 * log_variance).exp() * torch.randn(x.shape, generator=generator, device=x.device)
        else:
            x = mean  # no noise at the last step
    return x


@torch.no_grad()
def ddim_sample(model, diffusion, x, timesteps, spec, generator=None, callback=None):
    """DDIM, Song et al. 2021 eq. 12, over strided timesteps; eta = 0 is deterministic and
    eta = 1 matches the DDPM posterior variance."""
    alphas_cumprod = diffusion.alphas_cumprod_host[timesteps].tolist()  # host floats: the loop never syncs
    for i in reversed(range(len(timesteps))):
        t_cur = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        abar, abar_next = alphas_cumprod[i], (alphas_cumprod[i - 1] if i > 0 else 1.0)
        eps = model(x, t_cur)
        pred_xstart = xstart_from_eps(x, eps, abar)
        if spec.clip_x0 != "none":
            pred_xstart = clip_xstart(pred_xstart, spec.clip_x0)
            eps = (x - math.sqrt(abar) * pred_xstart) / math.sqrt(1 - abar)
        if callback:
            callback(len(timesteps) - 1 - i, timesteps[i], x, pred_xstart)
        sigma = spec.eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        x = math.sqrt(abar_next) * pred_xstart + math.sqrt(max(1 - abar_next - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return x


@torch.no_grad()
def dpmpp2m_sample(model, diffusion, x, timesteps, spec, generator=None, callback=None):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: a multistep second-order solver of the
    probability-flow ODE in the data prediction x0_hat; 10-50 steps. Deterministic (no generator).

    Here alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]) (DPM-Solver's
    alpha_t is DDPM's sqrt(alpha_bar_t)), and lambda_t = log(alpha_t / sigma_t). The first step is
    first order (it is DDIM); the last model call returns its x0_hat, the step to sigma = 0.
    Steps evenly spaced in lambda by default: with steps even in t, the last step from t ~ T/K to
    t = 0 spans most of the lambda range and the multistep extrapolation loses its accuracy."""
    alphas_cumprod = diffusion.alphas_cumprod_host[timesteps].tolist()  # host floats: the loop never syncs
    pred_prev, h_prev = None, None
    for i in reversed(range(len(timesteps))):
        t_cur = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        alpha_t, sigma_t = math.sqrt(alphas_cumprod[i]), math.sqrt(1 - alphas_cumprod[i])
        pred_xstart = clip_xstart(xstart_from_eps(x, model(x, t_cur), alphas_cumprod[i]), spec.clip_x0)
        if callback:
            callback(len(timesteps) - 1 - i, timesteps[i], x, pred_xstart)
        if i == 0:
            return pred_xstart
        alpha_next, sigma_next = math.sqrt(alphas_cumprod[i - 1]), math.sqrt(1 - alphas_cumprod[i - 1])
        h = math.log(alpha_next / sigma_next) - math.log(alpha_t / sigma_t)
        if pred_prev is None:
            d = pred_xstart
        else:  # D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * pred_xstart - (1 / (2 * r)) * pred_prev
        x = (sigma_next / sigma_t) * x - alpha_next * math.expm1(-h) * d
        pred_prev, h_prev = pred_xstart, h
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpmpp2m": dpmpp2m_sample}


def to_uint8(images):
    """(B, C, H, W) in [-1, 1] -> numpy uint8 (B, H, W, C), the layout FID tools read."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate_samples(model, diffusion, spec, shape, seed, batch_size=128, classes=None, procs=Processes(), guide=None):
    """shape[0] images of shape[1:] as uint8 (N, H, W, C), drawn as the SamplingSpec says, batch by
    batch with a progress bar; image i of class classes[i] when classes (N,) are given.

    Batch k draws its noise from (seed, k) alone, so the images do not depend on how many processes
    share the work: under torchrun rank r makes batches r, r + world, ... and every rank gets all."""
    num_samples, device = shape[0], diffusion.betas.device
    generator = torch.Generator(device=device)
    starts = range(0, num_samples, batch_size)
    mine = {}
    desc = f"sampling ({spec.sampler}, {spec.steps or diffusion.num_timesteps} steps)"
    with tqdm(total=num_samples, desc=desc, unit="img") as bar:
        for k in range(procs.rank, len(starts), procs.world):
            batch = (min(batch_size, num_samples - starts[k]), *shape[1:])
            generator.manual_seed(derived_seed(seed, k, SAMPLE_BATCH))
            labels = None if classes is None else classes[starts[k]:starts[k] + batch[0]]
            mine[k] = to_uint8(diffusion.sample(model, batch, spec, generator=generator, classes=labels, guide=guide))
            bar.update(batch[0] * procs.world)  # the others progress alike
    batches = {k: images for part in procs.gather(mine) for k, images in part.items()}
    return np.concatenate([batches[k] for k in range(len(starts))])


# --- Training: optimizer, EMA, LR schedule, the step, logs, the state and the loop ----------------

def build_optimizer(model, cfg):
    """AdamW (Adam when weight_decay is 0, as in the paper), fused into one kernel where it can be."""
    kwargs = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.fused_adamw:
        try:
            return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:  # no fused kernel for this device in this torch
            print(f"note: no fused AdamW here ({str(e).splitlines()[0][:120]}); the unfused one reads the "
                  f"non-finite check back from the device every step")
    return torch.optim.AdamW(model.parameters(), **kwargs)


class EMA:
    """Exponential moving average of the weights, with the usual warmup of the decay,
    min(decay, (1 + step) / (10 + step)), so early previews come from recent weights, not the init."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model, step):
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - self.decay_at(step))


MAX_SIGMA_REL = 12 ** -0.5  # the length of the power EMA with gamma = 0, a plain average of all weights


def power_ema_exponent(sigma_rel):
    """EDM2's gamma of a power-function EMA of relative length sigma_rel (Karras et al. 2024, Eq. 3):
    the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)."""
    c = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1, 7, 16 - c, 12 - c]) if abs(r.imag) < 1e-9))


class PowerEMA:
    """Power-function EMAs of the weights (Karras et al. 2024, "Analyzing and improving the training
    dynamics of diffusion models", Sec. 3.1): after update t (t = 1, 2, ...) each profile is
    beta_t * itself + (1 - beta_t) * weights, beta_t = (1 - 1/t)^(gamma + 1), which weighs the weights
    of update tau by tau^(gamma+1) - (tau-1)^(gamma+1): an average whose length grows with training,
    a fixed fraction sigma_rel of it. Their snapshots let --ema_length rebuild any other length."""

    def __init__(self, model, sigma_rels):
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [power_ema_exponent(s) for s in self.sigma_rels]
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model, step):
        """Average in the weights after update step + 1 (the state's step before it counts this one)."""
        t, weights = step + 1, list(model.parameters())
        for ema, gamma in zip(self.models, self.gammas):
            torch._foreach_lerp_(list(ema.parameters()), weights, 1.0 - (1.0 - 1.0 / t) ** (gamma + 1))

    def state_dict(self, dtype=None):
        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)  # noqa: E731
        return {"sigma_rels": list(self.sigma_rels),
                "models": [{k: cast(v) for k, v in ema.state_dict().items()} for ema in self.models]}

    def load_state_dict(self, saved):
        for ema, weights in zip(self.models, saved["models"]):
            ema.load_state_dict(weights)


class LRSchedule:
    """Linear warmup over warmup_steps, then a constant LR (the paper); PyTorch's
    CosineAnnealingWarmRestarts stepped every iteration with the fractional epoch since warmup; one
    cosine from the peak to min_lr over the rest of the run's planned steps (--epochs, cut at
    --max_steps), the schedule diffusers' training script uses, or up to --cosine_until; or StepLR's
    drops by gamma every step_size epochs after warmup, counted in steps."""

    def __init__(self, optimizer, cfg, steps_per_epoch):
        self.optimizer, self.base_lr, self.min_lr = optimizer, cfg.learning_rate, cfg.min_lr
        self.warmup_steps, self.steps_per_epoch, self.kind = cfg.warmup_steps, steps_per_epoch, cfg.scheduler
        self.cosine_end = cfg.cosine_until or planned_steps(cfg, steps_per_epoch)
        self.drop_every, self.gamma = cfg.step_size * steps_per_epoch, cfg.gamma
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts
        self.restarts = (restarts(optimizer, T_0=cfg.restart_period, T_mult=cfg.restart_mult, eta_min=cfg.min_lr)
                         if cfg.scheduler == "cosine_restarts" else None)

    def set_step(self, step):
        """Set the LR for optimizer update number `step` (0-based) and return it."""
        if step >= self.warmup_steps and self.restarts is not None:
            self.restarts.step((step - self.warmup_steps) / self.steps_per_epoch)
            return self.optimizer.param_groups[0]["lr"]
        if step < self.warmup_steps:
            lr = self.base_lr * (step + 1) / self.warmup_steps
        elif self.kind == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.cosine_end - self.warmup_steps))
            lr = self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        elif self.kind == "step":
            lr = self.base_lr * self.gamma ** ((step - self.warmup_steps) // self.drop_every)
        else:
            lr = self.base_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self):
        return self.restarts.state_dict() if self.restarts is not None else {}

    def load_state_dict(self, state):
        if self.restarts is not None:
            self.restarts.load_state_dict(state)


def planned_lrs(cfg, steps_per_epoch, steps):
    """The LR the run's schedule sets at each of these steps, computed by LRSchedule itself on a
    stand-in parameter (the restarts are PyTorch's, in closed form for any fractional epoch)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    schedule = LRSchedule(optimizer, cfg, steps_per_epoch)
    return np.array([schedule.set_step(int(s)) for s in steps])


LOW_LR = 0.01  # "the LR is at its floor": below 1% of the peak
SCHEDULE_FIXES = {
    "cosine": "raise --min_lr",
    "cosine_restarts": "raise --min_lr or --restart_period",
    "step": "raise --step_size or --gamma",
}


def lr_schedule_warning(cfg, steps_per_epoch, samples=2001):
    """A warning when the planned schedule spends more than a fifth of the run's steps below 1% of
    the peak LR (a cosine that ends too early, StepLR dropping too often): those steps barely train.
    None when it does not. The schedule is sampled at evenly spaced steps."""
    total = planned_steps(cfg, steps_per_epoch)
    if cfg.scheduler == "cosine" and cfg.cosine_until or total <= cfg.warmup_steps:
        return None  # a floor asked for by --cosine_until; or all warmup
    steps = np.unique(np.linspace(cfg.warmup_steps, total - 1, samples).round())  # a warmup starts low by design
    low = planned_lrs(cfg, steps_per_epoch, steps) < LOW_LR * cfg.learning_rate
    share = low.mean() * (total - cfg.warmup_steps) / total
    if share <= 0.2:
        return None
    first = int(steps[low.argmax()])
    return (f"warning: --scheduler {cfg.scheduler} keeps the LR below 1% of its peak {cfg.learning_rate:g} for "
            f"{share:.0%} of the run's {total:,} steps (from about step {first:,}), which barely train; "
            f"{SCHEDULE_FIXES.get(cfg.scheduler, 'change --scheduler')}")


def resume_lr_note(saved, cfg, steps_per_epoch, step):
    """What the LR does at a resumed run's next step when --epochs, --max_steps or --cosine_until
    moved the end of its cosine (or made a run that ended at its floor longer), said in one line with
    the flag that does the other; None when the cosine goes on as the checkpoint planned it."""
    if cfg.scheduler != "cosine":
        return None
    old_total, new_total = planned_steps(saved, steps_per_epoch), planned_steps(cfg, steps_per_epoch)
    old_end, new_end = saved.cosine_until or old_total, cfg.cosine_until or new_total
    if old_end == new_end and (old_total == new_total or step < new_end):
        return None
    before, after = (planned_lrs(plan, steps_per_epoch, [step])[0] for plan in (saved, cfg))  # the old plan, the new
    if step >= new_end:
        return (f"note: the LR stays at its floor {after:.3g} (the cosine ended at step {new_end:,}); to decay again "
                f"over the run's {new_total:,} steps instead, resume with --cosine_until 0")
    floor = "its floor " if before <= saved.min_lr * 1.0001 else ""
    return (f"note: the cosine now ends at step {new_end:,} instead of {old_end:,}, so at step {step:,} the LR goes "
            f"from {floor}{before:.3g} to {after:.3g}; to keep the old plan instead, resume with --cosine_until "
            f"{old_end}")


def timestep_probabilities(alphas_cumprod, logsnr_normal):
    """P(t) of training's timesteps (host float64 [T]): uniform for None, else the mass a normal
    (mean, std) of the log-SNR puts in each timestep's interval of log-SNR, between the midpoints
    to its neighbours (the first and last reaching to +-infinity), so that it sums to 1."""
    if logsnr_normal is None:
        return np.full(len(alphas_cumprod), 1.0 / len(alphas_cumprod))
    mean, std = logsnr_normal
    log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
    edges = np.concatenate([[np.inf], (log_snr[1:] + log_snr[:-1]) / 2, [-np.inf]])
    cdf = np.array([0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (edges - mean) / std])  # Phi at each edge
    return cdf[:-1] - cdf[1:]


class TrainingNoise:
    """What training adds to its images: each step's timesteps (drawn by --t_sampling's density)
    and noise, drawn for the whole global batch from (seed, step) alone, then sliced to this rank's
    images: resume and DDP draw what one uninterrupted process would."""

    def __init__(self, diffusion, t_sampling="uniform"):
        self.num_timesteps, self.cdf = diffusion.num_timesteps, None
        if T_SAMPLING[t_sampling] is not None:  # inverse-CDF draws from the host table
            probs = timestep_probabilities(diffusion.alphas_cumprod_host, T_SAMPLING[t_sampling])
            self.cdf = torch.from_numpy(np.cumsum(probs)).to(diffusion.betas.device)

    def draw(self, global_shape, shard, generator, seed, step):
        """(t, noise) of training step `step` for this rank's images."""
        generator.manual_seed(derived_seed(seed, step, BATCH_NOISE))
        device, n = generator.device, global_shape[0]
        if self.cdf is None:
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        else:
            t = self.timesteps(torch.rand(n, generator=generator, device=device, dtype=torch.float64))
        noise = torch.randn(global_shape, generator=generator, device=device)
        return t[shard], noise[shard]

    def timesteps(self, u):
        """The timesteps of uniforms u in [0, 1) (float64, on the table's device): the inverse CDF."""
        return torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.num_timesteps - 1)


def drop_labels(y, p, seed, step, batch_size, shard=slice(None), generator=None):
    """Replace each label by -1 ("no class") with probability p (classifier-free guidance's label
    dropout). The draw is made for the whole global batch from (seed, step) alone and then sharded,
    so a resumed run drops what an uninterrupted one would, and any number of processes drop alike.
    It is drawn on the labels' device (with `generator`, one of that device), so the step never
    waits for a copy from the host."""
    if y is None or p == 0:
        return y
    generator = generator or torch.Generator(y.device)
    generator.manual_seed(derived_seed(seed, step, LABEL_DROP))
    drop = torch.rand(batch_size, generator=generator, device=generator.device) < p
    return torch.where(drop[shard], -1, y)


class Batch(NamedTuple):
    """One step's inputs to L_simple: images in [-1, 1], their timesteps and noise, and their labels
    (-1 = no class) or None."""
    x_start: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: Optional[torch.Tensor] = None


def train_step(forward, diffusion, batch, optimizer, scaler, grad_clip, procs=Processes(), micro_batches=1):
    """One optimizer update on L_simple (Algorithm 1) of a Batch, skipped when the loss or the
    gradient is not finite. `forward` calls the model (under autocast, DDP, compile); the optimizer
    holds its parameters.
    With micro_batches K > 1 (--grad_accum) the batch runs as K forward and backward passes whose
    gradients add up to the whole batch's, with the same t and noise per image: the same update to
    float rounding, in 1/K of the activation memory. Under DDP the gradients are all-reduced once,
    in the last backward. Returns device tensors, so nothing waits for the GPU: the grad norm, the
    per-image losses (B,) and whether the step was skipped."""
    optimizer.zero_grad(set_to_none=True)
    x_start, t, noise, y = batch
    labels = (None,) * micro_batches if y is None else y.tensor_split(micro_batches)
    parts = zip(*(v.tensor_split(micro_batches) for v in (x_start, t, noise)), labels)
    losses = []
    for i, (x_part, t_part, noise_part, y_part) in enumerate(parts):
        last = i == micro_batches - 1
        with contextlib.nullcontext() if last else getattr(forward, "no_sync", contextlib.nullcontext)():
            part = diffusion.training_losses(forward, x_part, t_part, noise_part, y_part)
            # its share of the whole batch's mean (times exactly 1.0 without accumulation)
            scaler.scale(part.mean() * (len(part) / len(x_start))).backward()
        losses.append(part.detach())
    losses = torch.cat(losses) if micro_batches > 1 else losses[0]
    scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    # Gradients are already averaged over the ranks, but a loss can be infinite on one rank alone.
    bad = procs.sum_((~torch.isfinite(losses).all()).float().reshape(1)) + ~torch.isfinite(grad_norm)
    bad = bad.reshape(()) > 0
    step_unless(bad, optimizer, scaler)
    scaler.update()
    return grad_norm.detach(), losses.detach(), bad


def step_unless(bad, optimizer, scaler):
    """optimizer.step() unless `bad` (a device bool), leaving the weights and the Adam moments
    untouched. fp16's GradScaler skips overflowing steps itself; the fused AdamW kernel skips on
    a device flag (found_inf, as GradScaler drives it), so only unfused AdamW waits for the GPU."""
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, bad.float()
        optimizer.step()
    elif not bad.item():
        optimizer.step()


# Training rows fill loss..images_per_s; the row written after each epoch's evaluation fills val_loss
# (and fid, on --fid_every epochs).
DENOISING_T = (50, 250, 500, 750)  # where validation reports denoising quality: t of a 1,000-step chain
PSNR_CAP = 100.0  # dB: an exact prediction's PSNR, instead of infinity


LOSS_LOG_COLUMNS = ("step", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "grad_norm",
                    "bad_steps", "images_per_s", "elapsed_s", "session", "val_loss", "fid",
                    *(f"val_loss_t{k}" for k in DENOISING_T), *(f"psnr_t{k}" for k in DENOISING_T))


def csv_text(columns, rows):
    """A CSV file's text: the header, then the rows (dicts; keys outside columns ignored)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


class LossLog:
    """checkpoints/<run>/loss_log.csv, one row per log_every steps, flushed as it goes.

    On resume the rows after the checkpoint's step (written after the last save) are dropped, so
    the log continues exactly from the checkpoint instead of repeating steps; so is a training row
    after interval_step, the start of the log interval the checkpoint's Meter was summing (the last
    row of a run stopped off the --log_every grid): the resumed run writes that interval's row whole.
    loss_q0..q3 split the loss by timestep quartile (t < T/4, ...), as improved-diffusion logs it."""

    def __init__(self, path, resume_step=None, interval_step=None):
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.exists():
            last = resume_step if interval_step is None else interval_step
            rows = [row for row in self._rows_up_to(resume_step)
                    if int(row["step"]) <= last or not row.get("lr")]  # eval rows have no lr
        atomic_write_text(csv_text(LOSS_LOG_COLUMNS, rows), self.path)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOSS_LOG_COLUMNS)

    def _rows_up_to(self, last_step):
        """The rows with steps in order up to last_step; a row torn by a crash is dropped."""
        rows, previous = [], 0
        with open(self.path, newline="") as f:
            for row in csv.DictReader(f):
                complete = all(row.get(c) not in (None, "") for c in ("step", "epoch", "elapsed_s", "session"))
                if complete and row["step"].isdigit() and previous <= int(row["step"]) <= last_step:
                    rows.append(row)
                    previous = int(row["step"])
        return rows

    def write(self, **row):
        self.writer.writerow({name: row.get(name, "") for name in LOSS_LOG_COLUMNS})
        self.file.flush()

    def close(self):
        self.file.close()


class Meter:
    """Sums the loss and gradient norm on the device between log rows, so the step never waits for
    the GPU; reads them back (one .tolist()) only when a row is written. Counts the skipped
    (non-finite) steps, in total and in a row. Also keeps the clocks."""

    def __init__(self, device, num_timesteps, procs=Processes()):
        self.device, self.num_timesteps, self.procs = device, num_timesteps, procs
        self.consecutive_bad = torch.zeros((), device=device)
        self.worst_streak = torch.zeros((), device=device)  # since the last bad_streak() call
        self._start_interval(None, None)

    def start(self, step, elapsed_before):
        """Start the clocks of a session at `step`, after `elapsed_before` seconds of earlier ones."""
        self.elapsed_before, self.session_start, self.session_start_step = elapsed_before, time.perf_counter(), step
        self.interval_start = self.session_start
        if self.interval_step is None:  # else the unfinished interval of a checkpoint goes on
            self.interval_step = step

    def _start_interval(self, step, now):
        # per timestep quartile: [loss sums (4), image counts (4)], then the grad-norm sum, skipped steps
        self.sums = torch.zeros(10, device=self.device)
        self.interval_step, self.interval_start = step, now

    def add(self, grad_norm, losses, t, bad):
        """One step's device tensors; a skipped (bad) step counts only as skipped."""
        good = ~bad
        quartile = t * 4 // self.num_timesteps
        self.sums.index_add_(0, quartile, torch.where(good, losses.float(), 0.0))
        self.sums.index_add_(0, quartile + 4, good.float().expand(len(losses)))
        self.sums[8] += torch.where(good, grad_norm.float(), 0.0)
        self.sums[9] += bad.float()
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        self.worst_streak = torch.maximum(self.worst_streak, self.consecutive_bad)

    def bad_streak(self):
        """The longest run of consecutive skipped steps since the last call (a host sync: called
        every few steps only)."""
        worst = int(self.worst_streak.item())
        self.worst_streak.zero_()
        return worst

    def state_dict(self):
        """The unfinished log interval, so a resumed run writes the row an uninterrupted one would."""
        return dict(sums=self.sums.cpu(), interval_step=self.interval_step)

    def load_state_dict(self, state):
        if self.procs.main:  # the other ranks' part of that interval is not saved
            self.sums, self.interval_step = state["sums"].to(self.device), state["interval_step"]

    def pause(self, seconds):
        """Leave time spent on previews and checkpoints out of images/s."""
        self.interval_start += seconds

    def elapsed(self):
        """Wall time of the run over all its sessions."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def row(self, step, lr, batch_size, steps_per_epoch, session, end_interval=True):
        """A loss-log row averaging the steps since the previous row. end_interval=False (a row off
        the --log_every grid, at the end of a run) keeps summing, for a resumed run's next row."""
        sums = self.procs.sum_(self.sums[:8].clone())  # all ranks' images; the grad norm is the same on each
        values = torch.cat([sums, self.sums[8:]]).tolist()  # the one host sync of a log row
        loss_sums, counts, grad_norm_sum, bad = values[:4], values[4:8], values[8], int(values[9])
        now, n = time.perf_counter(), step - self.interval_step
        timed = step - max(self.interval_step, self.session_start_step)  # a resumed interval began before the clock
        row = dict(step=step, epoch=f"{step / steps_per_epoch:.4f}", lr=f"{lr:.6g}", bad_steps=bad,
                   loss=f"{sum(loss_sums) / sum(counts):.6f}" if sum(counts) else "",
                   grad_norm=f"{grad_norm_sum / (n - bad):.4f}" if n > bad else "",
                   images_per_s=f"{timed * batch_size / (now - self.interval_start):.1f}",
                   elapsed_s=f"{self.elapsed():.1f}", session=session,
                   **{f"loss_q{q}": f"{loss_sums[q] / counts[q]:.6f}" if counts[q] else "" for q in range(4)})
        if end_interval:
            self._start_interval(step, now)
        return row

    def eta(self, step, total_steps, max_minutes=0.0):
        """Time left until total_steps at this session's pace, or until --max_minutes if sooner."""
        rate = (step - self.session_start_step) / (time.perf_counter() - self.session_start)
        seconds = int((total_steps - step) / rate)
        if max_minutes:
            seconds = max(0, min(seconds, int(60 * max_minutes - self.elapsed())))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Validator:
    """The loss on held-out images at fixed timesteps (evenly covering [0, T), shuffled) and fixed
    noise, so that its value is comparable from epoch to epoch; and, at each t of DENOISING_T (scaled
    to the run's T), the loss there and the PSNR of the one-step prediction of x_0 from x_t with the
    same fixed noise: how well the model denoises at each noise level, in decibels."""

    def __init__(self, images, num_timesteps, seed, batch_size):
        g, n = torch.Generator().manual_seed(seed + 2), len(images)
        self.images, self.batch_size = images, batch_size
        self.t = (torch.arange(n) * num_timesteps // n)[torch.randperm(n, generator=g)].to(images.device)
        self.noise = torch.randn(images.shape, generator=g).to(images.device)
        self.denoising_t = [min(num_timesteps - 1, round(k * num_timesteps / 1000)) for k in DENOISING_T]

    @torch.no_grad()
    def metrics(self, model, diffusion):
        """{val_loss, val_loss_t50, ..., psnr_t50, ...}: the PSNR of x_0's prediction on [-1, 1] (peak
        to peak 2, as 0..255 pixels' 255), capped at PSNR_CAP; one host sync."""
        sums = torch.zeros(1 + 2 * len(self.denoising_t), device=self.images.device)
        for i in range(0, len(self.images), self.batch_size):
            x_start = self.images[i:i + self.batch_size].float() / 127.5 - 1
            noise = self.noise[i:i + self.batch_size]
            sums[0] += diffusion.training_losses(model, x_start, self.t[i:i + self.batch_size], noise).sum()
            for j, step in enumerate(self.denoising_t):
                t = torch.full((len(x_start),), step, device=x_start.device)
                x_t = diffusion.q_sample(x_start, t, noise)
                eps = model(x_t, t).float()
                x0 = diffusion.predict_xstart_from_eps(x_t, t, eps)
                sums[1 + 2 * j] += (eps - noise).square().mean(dim=(1, 2, 3)).sum()
                sums[2 + 2 * j] += (x0 - x_start).square().mean(dim=(1, 2, 3)).sum()
        values = [v / len(self.images) for v in sums.tolist()]
        out = {"val_loss": values[0]}
        for j, k in enumerate(DENOISING_T):
            mse = values[2 + 2 * j]
            out[f"val_loss_t{k}"] = values[1 + 2 * j]
            out[f"psnr_t{k}"] = min(PSNR_CAP, 10 * math.log10(4 / mse)) if mse > 0 else PSNR_CAP
        return out


def write_preview(run, epoch):
    """The epoch's grid of DDIM samples of the EMA model, from the same noise every time so that grids
    of different epochs compare, to the samples folder and TensorBoard. A class-conditional run
    previews --num_preview images of every class, a row each, named in the picture."""
    cfg, names = run.cfg, run.state.class_names
    shape = (cfg.num_preview * max(1, len(names)), 3, cfg.image_size, cfg.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)).to(run.device)
    classes = torch.arange(len(names)).repeat_interleave(cfg.num_preview) if names else None
    spec = SamplingSpec("ddim", cfg.preview_steps, clip_x0=cfg.clip_x0, guidance_scale=cfg.guidance_scale,
                        guide=run.guide_name)
    images = run.diffusion.sample(run.ema_forward, shape, spec, noise=noise, classes=classes, guide=run.guide)
    path = run.paths.samples / f"epoch_{epoch:04d}.png"
    save_grid(images, path, names, title=guidance_title(spec))
    run.board.image("preview", images, run.state.step)
    tqdm.write(f"preview: {path}")


class Board:
    """Scalars and preview grids, besides the loss log, to TensorBoard (--tensorboard) and to Weights
    & Biases (--wandb), each where asked for (on rank 0); both packages are optional. Made when the
    run is checked, so a missing package is reported before anything is written; start() opens the
    writers once the run holds its lock. Board() logs nowhere."""

    def __init__(self, cfg=None, paths=None):
        self.cfg, self.paths, self.writer, self.wandb = cfg, paths, None, None
        for wanted, module, package in ((cfg and cfg.tensorboard, "torch.utils.tensorboard", "tensorboard"),
                                        (cfg and cfg.wandb, "wandb", "wandb")):
            try:
                if wanted:
                    importlib.import_module(module)
            except ImportError:
                raise UserError(f"--{package} needs the {package} package: pip install {package}") from None

    def start(self):
        if self.cfg is not None and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.paths.checkpoints / "tensorboard"))
        if self.cfg is not None and self.cfg.wandb:
            self.wandb = start_wandb(self.cfg, self.paths)

    def scalars(self, prefix, values, step):
        values = {f"{prefix}/{name}": float(value) for name, value in values.items()
                  if name not in ("step", "epoch", "session") and value not in ("", None)}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({**values, "step": step})

    def image(self, name, images, step):
        if self.writer is None and self.wandb is None:
            return
        import torchvision
        grid = torchvision.utils.make_grid((images.clamp(-1, 1) + 1) / 2, nrow=min(10, len(images)))
        if self.writer is not None:
            self.writer.add_image(name, grid, step)
        if self.wandb is not None:
            import wandb
            pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            self.wandb.log({name: wandb.Image(pixels), "step": step})

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg, paths):
    """The W&B run of this training run, with its config: the id kept in <run>/wandb_run_id, so that
    every session of the run (resumes) logs to the same W&B run; its files go to <run>/wandb/.
    Everything is logged against the optimizer step ("step"), so a resumed session may log again
    from its checkpoint's step. WANDB_MODE=offline (W&B's own setting) keeps it all on this machine."""
    import wandb
    id_file = paths.checkpoints / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else os.urandom(4).hex()  # W&B: 8 of [a-z0-9]
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_id + "\n", id_file)
    run = wandb.init(project=cfg.wandb_project, name=cfg.run_name, id=run_id, resume="allow", config=asdict(cfg),
                     dir=str(paths.checkpoints))
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


@dataclass
class TrainState:
    """Everything a training checkpoint holds, as one object: the UNet (parameters and state dict),
    its EMA, the optimizer, the LR schedule, the fp16 loss scaler, the meter's unfinished log
    interval and the counters. state_dict(epoch) is the checkpoint, plain types and tensors (what
    weights_only loading accepts); no RNG state is needed, as every draw is derived from (seed,
    step) or (seed, epoch). load_state_dict(ckpt) continues a run exactly where it was saved."""
    cfg: Config
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_schedule: LRSchedule
    scaler: torch.amp.GradScaler
    meter: "Meter"
    class_names: tuple = ()   # a class-conditional run's classes, in label order; empty when unconditional
    power_ema: Optional[PowerEMA] = None  # --ema_profiles
    num_images: int = 0       # training images: a run resumes on the same data only
    step: int = 0             # optimizer updates done
    elapsed_s: float = 0.0    # training wall time over all sessions
    session: int = 0          # 0 for the first launch, +1 for each resume
    best_metric: float = math.inf  # lowest validation loss (or FID) so far: best.pt holds its weights
    bad_epochs: int = 0            # evaluations since it last improved (early stopping)

    @classmethod
    def new(cls, cfg, data, device, procs=Processes()):
        """A fresh run's state: the UNet initialised from the global RNG, on the device in its layout."""
        layout = use_channels_last(cfg.channels_last, device)
        model = place_model(build_model(cfg, len(data.class_names)), device, layout)
        ema, optimizer = EMA(model, cfg.ema_decay), build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.amp, device) == torch.float16)
        lr_schedule = LRSchedule(optimizer, cfg, steps_per_epoch(len(data.images), cfg.batch_size))
        return cls(cfg, model, ema, optimizer, lr_schedule, scaler, Meter(device, cfg.timesteps, procs),
                   tuple(data.class_names), PowerEMA(model, cfg.ema_profiles) if cfg.ema_profiles else None,
                   len(data.images))

    def state_dict(self, epoch):
        """The checkpoint, named after `epoch`; a class-conditional run also stores its class names."""
        return dict(**({"class_names": list(self.class_names)} if self.class_names else {}),
                    **({"power_ema": self.power_ema.state_dict()} if self.power_ema else {}),
                    format="train_ddpm/2", config=asdict(self.cfg), model=self.model.state_dict(),
                    ema=self.ema.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.lr_schedule.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch,
                    step=self.step, elapsed_s=self.elapsed_s, session=self.session, num_images=self.num_images,
                    loss_log_step=self.step, meter=self.meter.state_dict(), best_metric=self.best_metric,
                    bad_epochs=self.bad_epochs, torch_version=str(torch.__version__))

    def load_state_dict(self, ckpt):
        """Continue the run of a checkpoint (a new session of it), on the same data and classes."""
        check_same_classes(ckpt, self.class_names, "resume")
        if ckpt.get("num_images") != self.num_images:
            raise UserError(f"the training set has {self.num_images} images but the checkpoint was trained on "
                            f"{ckpt.get('num_images')}; resume with the same data")
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        if self.power_ema:
            self.power_ema.load_state_dict(ckpt["power_ema"])
        self.optimizer.load_state_dict(with_kernel_of(self.optimizer, ckpt["optimizer"]))
        lay_out_like_params(self.optimizer)
        self.lr_schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("meter"):
            self.meter.load_state_dict(ckpt["meter"])
        self.step, self.elapsed_s, self.session = ckpt["step"], ckpt["elapsed_s"], ckpt["session"] + 1
        self.best_metric, self.bad_epochs = ckpt.get("best_metric", math.inf), ckpt.get("bad_epochs", 0)


def with_kernel_of(optimizer, saved):
    """A saved optimizer state with this optimizer's kernel flags (fused, foreach): load_state_dict
    would otherwise take them from the file, and --fused_adamw may change on resume."""
    groups = [{**group, **{k: now[k] for k in ("fused", "foreach") if k in now}}
              for group, now in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def lay_out_like_params(optimizer):
    """Give each parameter's optimizer state (Adam's moments) the parameter's strides: a run may
    resume with another memory layout (CPU -> GPU, or --channels_last changed), and fused AdamW
    refuses a parameter and its state of different layouts."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def check_same_classes(ckpt, class_names, action):
    """A class-conditional checkpoint continues only on data with the same classes, in the same order."""
    saved = tuple(ckpt.get("class_names") or ())
    if saved != tuple(class_names):
        raise UserError(f"cannot {action}: the checkpoint was trained on the classes {', '.join(saved) or '(none)'} "
                        f"but the data has {', '.join(class_names) or '(none)'}")


def start_from_weights(path, model, ema, class_names=()):
    """--init_from: the weights and EMA of a checkpoint (one set of weights for both from an export
    or a diffusers folder); everything else starts fresh."""
    ckpt = read_checkpoint(resolve_checkpoint_path(path))
    check_same_classes(ckpt, class_names, f"start from {path}")
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt.get("ema", ckpt["model"]))
    print(f"weights{' and EMA' if 'ema' in ckpt else ''} from {path}")


def train(cfg, resume_from=None):
    """Train a run described by cfg (resuming from the checkpoint dict resume_from); returns the
    path of the last checkpoint written. Under torchrun every rank trains its shard of each global
    batch; rank 0 alone logs, evaluates, previews and saves."""
    device, procs = init_processes(cfg.device)
    paths = RunPaths.of(cfg)
    if resume_from is None:
        refuse_existing_run(paths)
    if cfg.batch_size % procs.world:
        raise UserError(f"--batch_size {cfg.batch_size} must be a multiple of the {procs.world} processes")
    if cfg.batch_size // procs.world % cfg.grad_accum:
        raise UserError(f"--grad_accum {cfg.grad_accum} must divide each process's {cfg.batch_size // procs.world} "
                        f"images of --batch_size {cfg.batch_size}")
    set_fast_math(cfg.tf32)
    torch.manual_seed(cfg.seed)
    data = load_training_data(cfg, procs, device)
    state = TrainState.new(cfg, data, device, procs)
    if resume_from is not None:
        state.load_state_dict(resume_from)
    elif cfg.init_from:
        start_from_weights(cfg.init_from, state.model, state.ema, data.class_names)
    run = Run(cfg, paths, procs, device, data, state)
    saved = config_from_dict(resume_from["config"]) if resume_from is not None else None
    for message in (lr_schedule_warning(cfg, run.n_batches),
                    saved and resume_lr_note(saved, cfg, run.n_batches, state.step)):
        if message:
            print(message, file=sys.stderr)
    procs.barrier()  # every rank has checked the run folder before rank 0 writes into it
    lock = RunLock(paths.checkpoints) if procs.main else None
    try:
        run.board.start()
        return train_loop(run, resumed=resume_from is not None)
    finally:
        run.board.close()
        if lock is not None:
            lock.release()


def load_training_data(cfg, procs, device):
    """The run's TrainingData with the training images (uint8) and labels on the device: CIFAR-10
    is 150 MB as uint8."""
    if not procs.main:
        procs.barrier()  # rank 0 downloads CIFAR-10 first, alone
    data = load_dataset(cfg)
    if procs.main:
        procs.barrier()
    if len(data.images) < cfg.batch_size:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the {len(data.images)} training images; "
                        f"use --batch_size {len(data.images)} or less")
    return data._replace(images=data.images.to(device), labels=None if data.labels is None else data.labels.to(device))


class Run:
    """What the training loop works with besides the TrainState (data: the training images (uint8)
    and labels on the device), checked: it refuses a run already at its end, and fails on a missing
    optional package (FID, TensorBoard) before anything is written."""

    def __init__(self, cfg, paths, procs, device, data, state):
        self.cfg, self.paths, self.procs, self.device, self.data, self.state = cfg, paths, procs, device, data, state
        channels_last, amp_dtype = use_channels_last(cfg.channels_last, device), autocast_dtype(cfg.amp, device)
        net = state.model if procs.world == 1 else torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            net = compile_model(net, cfg, procs.world)
        n_batches, val = steps_per_epoch(len(data.images), cfg.batch_size), data.val
        print(f"UNet: {count_parameters(state.model) / 1e6:.2f}M parameters | {len(data.images):,} training images"
              f"{f' of {len(data.class_names)} classes' if data.class_names else ''}, "
              f"{n_batches} steps per epoch | {0 if val is None else len(val):,} validation images "
              f"| {device}{f' x {procs.world} processes' if procs.world > 1 else ''}, "
              f"{precision_name(amp_dtype)} autocast"
              f"{', channels_last' if channels_last else ''}{', compiled' if cfg.compile else ''}")
        if amp_dtype == torch.float16 and device.type == "cpu":
            print("warning: CPUs have no fast fp16 kernels, so --amp fp16 is slow here; use --amp bf16 or off",
                  file=sys.stderr)
        self.n_batches, self.total_steps = n_batches, planned_steps(cfg, n_batches)  # n_batches: steps per epoch
        if state.step >= self.total_steps:
            raise UserError(f"the run is already at step {state.step} (epoch {state.step // n_batches}); "
                            f"raise --epochs or --max_steps to train further")
        if cfg.max_minutes and state.elapsed_s >= 60 * cfg.max_minutes:
            raise UserError(f"the run has already trained {state.elapsed_s / 60:.1f} minutes; "
                            f"raise --max_minutes to train further")
        self.diffusion = build_diffusion(cfg).to(device)
        self.training_noise = TrainingNoise(self.diffusion, cfg.t_sampling)
        self.forward = Precision(net, device, amp_dtype, channels_last)  # autocast, channels_last, DDP, compile
        self.ema_forward = Precision(state.ema.model, device, amp_dtype, channels_last)  # previews, evaluation
        self.validator = (Validator(val.to(device), cfg.timesteps, cfg.seed, cfg.batch_size)
                          if val is not None and procs.main else None)
        self.guide, self.guide_name = None, ""
        if cfg.guide and procs.main:  # previews and FID are rank 0's
            guide, self.guide_name = read_guide(cfg.guide, cfg.guide_ema_length, cfg, data.class_names)
            self.guide = model_from_checkpoint(guide, True, device, cfg.amp, cfg.channels_last)[0]
        self.fid = (FidDuringTraining(cfg, paths, device, data.class_names, self.guide, self.guide_name)
                    if cfg.fid_every and procs.main else None)
        self.board = Board(cfg, paths) if procs.main else Board()
        self.shard = procs.shard(cfg.batch_size)  # this process's images of each global batch
        self.check_every = min(cfg.log_every, cfg.max_bad_steps)  # steps between the stop checks' host syncs (DDP)
        self.noise_generator, self.label_generator = torch.Generator(device), torch.Generator(device)


def train_loop(run, resumed=False):
    """The training loop, over global steps: a step, its log row, the stop checks, and after each
    epoch its upkeep. It ends for one reason: done (every step, or early stopping), time
    (--max_minutes; resumable with more), bad (--max_bad_steps non-finite steps in a row) or signal
    (SIGINT, SIGTERM); the last two save where they are and raise Stopped."""
    cfg, state, procs = run.cfg, run.state, run.procs
    log, saver = open_loss_log(run, resumed), Saver(run.paths, state)
    batches, bar, stop = run_batches(run), None, None
    state.model.train()
    with GracefulStop() as signals:
        while stop is None:
            bar = bar or tqdm(total=run.n_batches, initial=state.step % run.n_batches, unit="step", dynamic_ncols=True,
                              desc=f"epoch {state.step // run.n_batches + 1}/{cfg.epochs}", disable=not procs.main)
            lr = take_step(run, *next(batches))
            bar.update(1)
            if procs.main and saver.snapshot_due(state.step):
                saver.save_ema_snapshot()
            if state.step % cfg.log_every == 0 or state.step == run.total_steps:
                row = state.meter.row(state.step, lr, cfg.batch_size, run.n_batches, state.session,
                                      end_interval=state.step % cfg.log_every == 0)
                if procs.main:
                    log.write(**row)
                    run.board.scalars("train", row, state.step)
                bar.set_postfix(loss=row["loss"], lr=row["lr"], img_s=row["images_per_s"],
                                eta_total=state.meter.eta(state.step, run.total_steps, cfg.max_minutes))
            stop = stop_reason(run, signals)
            if stop is None and procs.main and saver.due(state.step):
                saver.save(state.step // run.n_batches, "latest.pt")
            if stop == "bad" or (stop == "signal" and state.step % run.n_batches):
                break  # mid-epoch: straight to the save below
            if state.step % run.n_batches == 0 or stop in ("done", "time"):
                bar.close()
                bar = None
                stop = end_of_epoch(run, stop, signals, log, saver)
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if stop in ("bad", "signal") and procs.main and saver.last_step != state.step:
            saver.save(state.step // run.n_batches, "latest.pt")
        procs.barrier()
    if stop in ("bad", "signal"):
        raise stop_message(stop, signals.agreed, saver, procs)
    if stop == "time" and procs.main and state.step < run.total_steps:
        print(f"--max_minutes {cfg.max_minutes:g} reached at step {state.step:,} of {run.total_steps:,}; to train "
              f"on: {resume_command(saver.last_path, procs)} --max_minutes {2 * cfg.max_minutes:g}")
    return saver.last_path


def open_loss_log(run, resumed):
    """Start the clocks; on rank 0 write config.json and open the loss log (a resumed run's from
    its checkpoint's step on). None on the other ranks."""
    run.state.meter.start(run.state.step, run.state.elapsed_s)
    if not run.procs.main:
        return None
    run.paths.samples.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(asdict(run.cfg), indent=2) + "\n", run.paths.checkpoints / "config.json")
    return LossLog(run.paths.loss_log, resume_step=run.state.step if resumed else None,
                   interval_step=run.state.meter.interval_step)


def run_batches(run):
    """This process's (images, labels) of every step from the state's step on, epoch after epoch."""
    cfg = run.cfg
    for epoch in range(run.state.step // run.n_batches, cfg.epochs):
        yield from epoch_batches(run.data.images, cfg.batch_size, epoch, cfg.seed, cfg.flip,
                                 run.state.step - epoch * run.n_batches, run.shard, run.data.labels)


def take_step(run, x_start, y):
    """One optimizer step at the state's step, with that step's timesteps, noise, label dropout and
    dropout masks (all derived from (seed, step)), then the EMA; returns the LR it used."""
    cfg, state, procs = run.cfg, run.state, run.procs
    lr = state.lr_schedule.set_step(state.step)
    t, noise = run.training_noise.draw((cfg.batch_size, 3, cfg.image_size, cfg.image_size), run.shard,
                                       run.noise_generator, cfg.seed, state.step)
    y = drop_labels(y, cfg.class_dropout, cfg.seed, state.step, cfg.batch_size, run.shard, run.label_generator)
    torch.manual_seed(derived_seed(cfg.seed, state.step, DROPOUT, procs.rank))  # ranks differ here
    grad_norm, losses, bad = train_step(run.forward, run.diffusion, Batch(x_start, t, noise, y), state.optimizer,
                                        state.scaler, cfg.grad_clip, procs, cfg.grad_accum)
    state.ema.update(state.model, state.step)
    if state.power_ema:
        state.power_ema.update(state.model, state.step)
    state.step += 1
    state.meter.add(grad_norm, losses, t, bad)
    return lr


def stop_reason(run, signals):
    """Why the run stops after this step (bad, signal, time, done), or None. Under DDP every rank
    must stop at the same step, so they decide together every check_every steps (host syncs)."""
    state, cfg, procs = run.state, run.cfg, run.procs
    check = state.step % run.check_every == 0
    if check and procs.any(state.meter.bad_streak() >= cfg.max_bad_steps, run.device):
        return "bad"
    if check or procs.world == 1:
        received = agreed_signal(signals, procs, run.device)
        late = procs.any(bool(cfg.max_minutes) and state.meter.elapsed() >= 60 * cfg.max_minutes, run.device)
        if received or late:
            return "signal" if received else "time"
    return "done" if state.step >= run.total_steps else None


def end_of_epoch(run, stop, signals, log, saver):
    """The upkeep after an epoch, or at the run's end inside one, on rank 0: validation and FID,
    the preview grid, the saves; with a signal waiting, only the save, at once (before a
    scheduler's SIGKILL). Then every rank agrees whether to go on. Returns the stop reason: None,
    done (a late signal changes nothing then), time or signal."""
    cfg, state, procs = run.cfg, run.state, run.procs
    finished = stop in ("done", "time") or state.step >= run.total_steps
    epoch, pause_start = -(-state.step // run.n_batches), time.perf_counter()  # the epoch just ended
    if procs.main:
        improved = False
        if not (stop == "signal" or signals.received):
            improved, early = evaluate(run, log, epoch, finished)
            finished = finished or early
        if cfg.sample_every and (epoch % cfg.sample_every == 0 or finished) and not signals.received:
            write_preview(run, epoch)
        if epoch % cfg.save_every == 0 or finished or signals.received:
            saver.save(epoch)
        if improved:
            saver.save(epoch, "best.pt")
    finished = procs.any(finished, run.device)  # early stopping is rank 0's decision
    state.meter.pause(time.perf_counter() - pause_start)  # images/s counts training time only
    if finished:
        return "time" if stop == "time" else "done"
    return stop or ("signal" if agreed_signal(signals, procs, run.device) else None)


def metrics_line(metrics):
    """An epoch's evaluation in one line: the validation loss, FID and the PSNR at each t."""
    parts = [f"{name} {metrics[name]:.5f}" for name in ("val_loss", "fid") if name in metrics]
    if "psnr_t50" in metrics:
        parts.append("PSNR of x_0 from x_t at t=" + "/".join(map(str, DENOISING_T)) + " (of 1000): "
                     + "/".join(f"{metrics[f'psnr_t{k}']:.1f}" for k in DENOISING_T) + " dB")
    return "  ".join(parts) + " (EMA weights)"


def evaluate(run, log, epoch, finished):
    """Validation loss (and FID on --fid_every epochs) of the EMA weights after an epoch, logged.
    Returns (improved on the best so far, early stopping says stop)."""
    cfg, state = run.cfg, run.state
    metrics = {}
    if run.validator is not None:
        metrics.update(run.validator.metrics(run.ema_forward, run.diffusion))
    if run.fid is not None and (epoch % cfg.fid_every == 0 or finished):
        metrics["fid"] = run.fid(run.ema_forward, run.diffusion, state.step)
    if not metrics:
        return False, False
    log.write(step=state.step, epoch=f"{state.step / run.n_batches:.4f}", elapsed_s=f"{state.meter.elapsed():.1f}",
              session=state.session, **{name: f"{value:.6f}" for name, value in metrics.items()})
    run.board.scalars("eval", metrics, state.step)
    tqdm.write(metrics_line(metrics))
    monitored = metrics.get("fid" if cfg.fid_every else "val_loss")
    if monitored is None:
        return False, False
    improved = monitored < state.best_metric
    state.best_metric = min(state.best_metric, monitored)
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    stop = cfg.early_stopping and state.bad_epochs >= cfg.patience
    if stop:
        tqdm.write(f"early stopping: no better {'FID' if cfg.fid_every else 'validation loss'} for "
                   f"{state.bad_epochs} evaluations; the best weights are in best.pt")
    return improved, stop


# --- Run safety: run folders, atomic checkpoints, resume, locks, signals --------------------------

@dataclass
class RunPaths:
    checkpoints: Path
    samples: Path

    @classmethod
    def of(cls, cfg):
        return cls(Path(cfg.checkpoint_dir) / cfg.run_name, Path(cfg.samples_dir) / cfg.run_name)

    @property
    def loss_log(self):
        return self.checkpoints / "loss_log.csv"

    @property
    def ema_snapshots(self):
        return self.checkpoints / "ema_snapshots"


def refuse_existing_run(paths):
    """Never overwrite a run: a new run needs a run folder without checkpoints. A loss log alone is
    what a run stopped before its first save leaves; with nothing to resume, it is started afresh."""
    if find_latest_checkpoint(paths.checkpoints) is not None:
        raise UserError(f"{paths.checkpoints} already holds checkpoints of a run; continue it with "
                        f"--resume latest, or start a new one with another --run_name")
    if paths.loss_log.exists():
        print(f"note: {paths.checkpoints} has a loss log but no checkpoint (a run stopped before its first "
              f"save); starting it afresh")


def atomic_write(path, write):
    """Call write(f) on a temp file in the same folder, fsync, then rename: a crash leaves the old
    file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows)
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def point_latest_at(checkpoint_path):
    """Make latest.pt the same file as checkpoint_path: a hard link renamed into place (atomic,
    no second copy on disk), or an atomic copy where the file system has no hard links."""
    checkpoint_path = Path(checkpoint_path)
    latest = checkpoint_path.with_name("latest.pt")
    tmp = latest.with_name(f".latest.pt.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint_path, tmp)
        os.replace(tmp, latest)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_torch_save(torch.load(checkpoint_path, map_location="cpu", weights_only=True), latest)
    _fsync_dir(latest.parent)


def epoch_checkpoints(run_dir):
    return sorted(Path(run_dir).glob("ddpm_ts*_epoch*.pt"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def find_latest_checkpoint(run_dir):
    """latest.pt in run_dir, else the newest epoch checkpoint; None when the folder holds none."""
    run_dir = Path(run_dir)
    if (run_dir / "latest.pt").is_file():
        return run_dir / "latest.pt"
    found = epoch_checkpoints(run_dir) if run_dir.is_dir() else []
    return found[-1] if found else None


def checkpoint_bytes(ckpt):
    """About the size of the checkpoint file: the bytes of its tensors."""
    if isinstance(ckpt, torch.Tensor):
        return ckpt.numel() * ckpt.element_size()
    if isinstance(ckpt, dict):
        return sum(checkpoint_bytes(v) for v in ckpt.values())
    if isinstance(ckpt, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in ckpt)
    return 0


class Saver:
    """Writes the training state: epoch checkpoints, latest.pt every --save_every_steps steps or
    --save_every_minutes, best.pt. A save that would not fit on the disk is skipped with a warning,
    keeping the previous file (the writes are atomic, so a full disk never leaves a partial one)."""

    def __init__(self, paths, state):
        self.paths, self.state, self.cfg = paths, state, state.cfg
        self.last_path, self.last_step, self.last_time = None, None, time.monotonic()

    def due(self, step):
        by_steps = self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0
        by_time = self.cfg.save_every_minutes and time.monotonic() - self.last_time >= 60 * self.cfg.save_every_minutes
        return bool(by_steps or by_time)

    def snapshot_due(self, step):
        """--ema_snapshot_every: this step's images crossed a multiple of it."""
        every, batch = self.cfg.ema_snapshot_every, self.cfg.batch_size
        return bool(self.state.power_ema) and step * batch // every > (step - 1) * batch // every

    def save_ema_snapshot(self):
        """The power EMAs now, in fp16, as <run>/ema_snapshots/ema_step<step>.pt: what --ema_length is
        rebuilt from. Never pruned; a resumed run writes the same files again, bit for bit."""
        start, state = time.perf_counter(), self.state
        path = self.paths.ema_snapshots / f"ema_step{state.step:09d}.pt"
        try:
            path.parent.mkdir(exist_ok=True)
            atomic_torch_save({"step": state.step, **state.power_ema.state_dict(torch.float16)}, path)
        except OSError as e:
            tqdm.write(f"warning: could not save the EMA snapshot {path} ({e.strerror or e})", file=sys.stderr)
        self.state.meter.pause(time.perf_counter() - start)

    def save(self, epoch, name=None):
        start = time.perf_counter()
        self.state.elapsed_s = self.state.meter.elapsed()
        ckpt = self.state.state_dict(epoch)
        path = self.paths.checkpoints / (name or f"ddpm_ts{self.cfg.timesteps}_epoch{epoch:04d}.pt")
        need, free = checkpoint_bytes(ckpt), shutil.disk_usage(self.paths.checkpoints).free
        if free < need + 64 * 2 ** 20:
            tqdm.write(f"warning: not saving {path.name}: it needs {need / 2 ** 20:.0f} MB and the disk has "
                       f"{free / 2 ** 20:.0f} MB free; free some space (the previous checkpoint is kept)",
                       file=sys.stderr)
            return None
        try:
            atomic_torch_save(ckpt, path)
            if name is None:  # an epoch checkpoint also becomes latest.pt, and older ones are pruned
                point_latest_at(path)
                if self.cfg.keep_last > 0:
                    for old in epoch_checkpoints(path.parent)[:-self.cfg.keep_last]:
                        old.unlink()
        except OSError as e:
            tqdm.write(f"warning: could not save {path} ({e.strerror or e}); the previous checkpoint is kept",
                       file=sys.stderr)
            return None
        if name != "best.pt":
            self.last_path, self.last_step, self.last_time = path, self.state.step, time.monotonic()
            if name is None:
                tqdm.write(f"checkpoint: {path}")
        self.state.meter.pause(time.perf_counter() - start)
        return path


def config_from_dict(values):
    """A Config from a saved dict: lists back to tuples, unknown keys (from other versions) ignored,
    missing keys of LEGACY_VALUES given the value the checkpoint was trained with."""
    known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in CONFIG_FIELDS}
    return Config(**{**LEGACY_VALUES, **known})


_TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                           "(1)", "(2)", "In PyTorch")


def _load_failure_reason(error):
    """The informative line of a torch.load error. For a weights_only refusal that is the object it
    refused (e.g. a blocked os.system), not torch's generic advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if not lines[0].startswith("Weights only load failed"):
        return lines[0].split(". ")[0][:300]
    details = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines
               if not line.startswith(_TORCH_LOAD_BOILERPLATE)]
    detail = next((d for d in details if d), "unsupported content")
    return f"refused to unpickle it, as only plain weights are ever loaded: {detail[:300]}"


def read_checkpoint(path):
    """The checkpoint dict, loaded without running any pickled code: torch.load(weights_only=True),
    which unpickles only tensors and plain containers, a weights-only .safetensors file, or a
    diffusers folder."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        good = newest_good_checkpoint(path)
        hint = (f"; resume from {good} instead, the newest checkpoint there that loads" if good else
                f"; no other checkpoint in {path.parent} loads")
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({_load_failure_reason(e)}){hint}") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise UserError(f"{path} is not a train_ddpm.py checkpoint (no model and config inside)")
    return ckpt


def newest_good_checkpoint(bad):
    """The newest other checkpoint beside `bad` that loads, or None."""
    candidates = [p for p in Path(bad).parent.glob("*.pt") if p.is_file() and not p.samefile(bad)]
    for p in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            continue
        if isinstance(ckpt, dict) and {"model", "config"} <= ckpt.keys():
            return p
    return None


class RunLock:
    """checkpoints/<run>/.lock holds the pid of the process writing the run, so that a second
    process (a new run or a resume) cannot write into it at the same time. A lock whose process
    is gone (killed, crashed) is stale and taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S")))
        tmp = self.path.with_name(f".lock.tmp-{os.getpid()}")
        tmp.write_text(mine + "\n")
        try:
            while not self._link_into_place(tmp):
                self._refuse_unless_stale()
        finally:
            tmp.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(".*.tmp*"):  # temporary files of a writer killed mid-write
            if not leftover.name.startswith(".lock."):  # (another starter's lock, on its way in, is not)
                leftover.unlink(missing_ok=True)

    def _link_into_place(self, tmp):
        """Create the lock with its contents in one step (a hard link), so nobody reads it half-written;
        False when there is one already."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        return True

    def _refuse_unless_stale(self):
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}  # unreadable: a crash while writing it
        if owner.get("host") not in (None, socket.gethostname()):
            raise UserError(f"{self.path.parent} is in use by pid {owner.get('pid')} on {owner['host']}; if no "
                            f"run is writing there any more, delete {self.path}")
        if owner.get("pid") and owner["pid"] != os.getpid() and _process_alive(owner["pid"]):
            raise UserError(f"{self.path.parent} is in use by another training process (pid {owner['pid']}, "
                            f"started {owner.get('started', '?')}); wait for it or stop it, or use another --run_name "
                            f"(if no run is writing there, e.g. after a container restart, delete {self.path})")
        print(f"note: taking over the stale lock of pid {owner.get('pid', '?')} (no longer running)")
        self.path.unlink(missing_ok=True)

    def release(self):
        self.path.unlink(missing_ok=True)


def _process_alive(pid):
    try:
        with contextlib.suppress(PermissionError):  # alive, owned by someone else
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class GracefulStop:
    """SIGINT (Ctrl-C) and SIGTERM while training: the first lets the step finish and the run save
    (see received); a second one quits at once, and the atomic writes leave every file whole. The
    handler only records: printing from it could land inside another write to the terminal."""

    def __init__(self):
        self.received, self.agreed, self.previous = None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *error):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise Stopped(f"{signal.Signals(signum).name} again: quit at once; the files written so far are "
                          f"whole (the newest checkpoint is in latest.pt)", 128 + signum)
        self.received = signum


def agreed_signal(signals, procs, device):
    """The signal received (by any rank: all must stop at the same step), or None; kept as
    signals.agreed, the one the run stops for (SIGTERM on a rank that received none itself)."""
    if not procs.any(signals.received is not None, device):
        return None
    received = signals.agreed = signals.received or signal.SIGTERM
    if procs.main:
        tqdm.write(f"{signal.Signals(received).name}: saving, then stopping (Ctrl-C again quits at once)",
                   file=sys.stderr)
    return received


class Stopped(Exception):
    """The run stopped early on purpose (a signal, or non-finite steps): a message and an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def this_command():
    return f"python {Path(sys.argv[0]).name or 'train_ddpm.py'}"


def resume_command(checkpoint, procs):
    launcher = f" --num_gpus {procs.world}" if procs.world > 1 else ""
    return f"{this_command()} --mode train --resume {checkpoint}{launcher}"


def sample_command(cfg, last):
    """The command that samples a finished run. With power-EMA profiles: DPM-Solver++(2M) in 20 steps
    from the EMA of length 0.05 (else the first profile), autoguided at w 2 by the run's last epoch
    checkpoint within the first quarter of its epochs (else within the first half), that
    checkpoint's EMA of the same length: on cpu_hour, guides from a sixth to a half of the run all
    gained, w 2 to 2.5 was best, this rule's choice (epoch 3 of 12, w 2) scored within 1.5 FID of
    the best measured after the hour, and 100 ancestral steps scored no better guided than these 20
    (BENCHMARKS.md, "Autoguidance", "The uniform hour autoguided", "The quality race at 150,000
    images")."""
    command = f"{this_command()} --mode sample --checkpoint {last}"
    epochs = {int(m[1]): path for path in epoch_checkpoints(Path(last).parent)
              if (m := re.fullmatch(r".*_epoch(\d+)\.pt", path.name))}
    last_epoch = max(epochs, default=0)
    early = [e for e in epochs if e <= last_epoch / 4] or [e for e in epochs if e <= last_epoch / 2]
    if not cfg.ema_profiles or not early:
        return command
    length = f"{0.05 if 0.05 in cfg.ema_profiles else cfg.ema_profiles[0]:g}"
    return (f"{command} --sampler dpmpp2m --sampling_steps 20 --ema_length {length} --guide {epochs[max(early)]} "
            f"--guide_ema_length {length} --guidance_scale 2")


def stop_message(stop, signum, saver, procs):
    """The Stopped of a run stopped by non-finite steps (bad) or a signal: what happened, whether it
    was saved, how to resume."""
    cfg = saver.state.cfg
    checkpoint = saver.last_path or find_latest_checkpoint(saver.paths.checkpoints)
    resume = f"resume with: {resume_command(checkpoint, procs)}" if checkpoint else "no checkpoint was written"
    if saver.last_step != saver.state.step:
        resume = f"the last save failed (see the warning); {resume}"
    if stop == "bad":
        return Stopped(f"stopped: {cfg.max_bad_steps} steps in a row had a non-finite loss or gradient and were "
                       f"skipped, so the weights are the last good ones ({checkpoint}); likely causes: a learning rate "
                       f"too high (--learning_rate {cfg.learning_rate:g}), fp16 overflow (use --amp bf16 or off), "
                       f"no gradient clipping, or broken input images; {resume} and changed flags", 1)
    name = signal.Signals(signum).name
    outcome = "saved" if saver.last_step == saver.state.step else "not saved"
    return Stopped(f"{name}: stopped at step {saver.state.step} and {outcome}; {resume}", 128 + signum)


# --- Sampling and evaluating a checkpoint: --mode sample and eval ---------------------------------

def resolve_checkpoint_path(path):
    """A checkpoint file or diffusers folder, or a run folder meaning its newest checkpoint."""
    path = Path(path)
    if path.is_dir() and diffusers_unet_folder(path) is None:
        found = find_latest_checkpoint(path)
        if found is None:
            raise UserError(f"no checkpoints in {path}; train first or name a .pt file")
        return found
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def sampling_source(ckpt, use_ema=True):
    """The key of the weights that sampling and exports use: "ema" unless use_ema=False or the
    checkpoint keeps none (an export or a diffusers folder holds one set, under "model")."""
    return "ema" if use_ema and "ema" in ckpt else "model"


def sampling_weights(ckpt, use_ema=True):
    """Those weights in words: "ema" (or the power EMA --ema_length rebuilt), "raw", or "stored" for the
    one set of an export or diffusers folder."""
    if sampling_source(ckpt, use_ema) == "ema":
        return ckpt.get("ema_name", "ema")
    return "raw" if "ema" in ckpt or "optimizer" in ckpt else "stored"


def load_checkpoint(path, use_ema=True, device="cpu", amp="auto", channels_last="auto"):
    """(model in eval mode, diffusion, Config) for sampling from `path`: a .pt checkpoint, a .safetensors
    export, a run folder (its newest checkpoint) or a diffusers DDPMPipeline/UNet2DModel folder. The model
    is a Precision caller (--amp, --channels_last) of the UNet, with the EMA weights unless use_ema=False."""
    return model_from_checkpoint(read_checkpoint(resolve_checkpoint_path(path)), use_ema, device, amp, channels_last)


def model_from_checkpoint(ckpt, use_ema=True, device="cpu", amp="auto", channels_last="auto"):
    """(model in eval mode, diffusion, Config) from a checkpoint dict already read."""
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg, len(ckpt.get("class_names") or ()))
    model.load_state_dict(ckpt[sampling_source(ckpt, use_ema)])
    device = torch.device(device)
    layout = use_channels_last(channels_last, device)
    model = place_model(model, device, layout).eval()
    caller = Precision(model, device, autocast_dtype(amp, device), layout)
    caller.class_names = tuple(ckpt.get("class_names") or ())  # a class-conditional model's labels, in order
    return caller, build_diffusion(cfg).to(device), cfg


def profile_products(t_a, gamma_a, t_b, gamma_b):
    """Inner products <p_a, p_b> of power-EMA profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
    [0, t] (EDM2, App. C.2), broadcast over arrays. Exact for the EMAs PowerEMA tracks: their weight of
    update tau is this profile's integral over [tau - 1, tau]."""
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_hi = np.where(t_a <= t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_lo / t_hi) ** gamma_hi / ((gamma_a + gamma_b + 1) * t_hi)


def posthoc_coefficients(basis, target):
    """EDM2's post-hoc EMA (Karras et al. 2024, App. C.2): the least-squares x with sum_i x_i p_i closest
    (in L2) to the target profile, for basis and target (t, gamma) pairs; and the fit's relative error."""
    t, gamma = (np.asarray(v, dtype=np.float64) for v in zip(*basis))
    t_out, gamma_out = target
    a = profile_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_products(t, gamma, t_out, gamma_out)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    c = profile_products(t_out, gamma_out, t_out, gamma_out)
    return x, math.sqrt(max(x @ a @ x - 2 * x @ b + c, 0.0) / c)


def ema_snapshots(folder, before_step):
    """{step: path} of a run's EMA snapshots taken before `before_step`."""
    found = (re.fullmatch(r"ema_step(\d+)\.pt", p.name) for p in Path(folder).glob("ema_step*.pt"))
    return {int(m[1]): Path(folder) / m[0] for m in found if m and int(m[1]) < before_step}


def posthoc_ema(ckpt, run_dir, sigma_rel):
    """The checkpoint with its "ema" replaced by the power EMA of length sigma_rel at the checkpoint's
    step, rebuilt from the run's snapshots and the checkpoint's own profiles (--ema_length)."""
    saved = ckpt.get("power_ema")
    if not saved:
        raise UserError("--ema_length needs a checkpoint of a run trained with --ema_profiles; this one tracked "
                        "only its --ema_decay EMA (sample without --ema_length)")
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"--ema_length must be in (0, {MAX_SIGMA_REL:.4f}), e.g. 0.05 or 0.10")
    sigma_rels, step = saved["sigma_rels"], ckpt["step"]
    gammas = [power_ema_exponent(s) for s in sigma_rels]
    snapshots = ema_snapshots(Path(run_dir) / "ema_snapshots", step)
    sources = [(t, path) for t, path in sorted(snapshots.items())] + [(step, None)]
    coefficients, error = posthoc_coefficients([(t, g) for t, _ in sources for g in gammas],
                                               (step, power_ema_exponent(sigma_rel)))
    ema = {k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    for k, (t, path) in enumerate(sources):
        models = saved["models"] if path is None else _read_snapshot(path, sigma_rels)
        for weight, model in zip(coefficients[k * len(gammas):(k + 1) * len(gammas)], models):
            for name, value in model.items():
                if value.is_floating_point():
                    ema[name].add_(value.float(), alpha=float(weight))
    ema = {k: v.to(ckpt["ema"][k].dtype) for k, v in ema.items()}
    print(f"power EMA sigma_rel {sigma_rel:g} at step {step:,}: rebuilt from {len(snapshots)} snapshots and the "
          f"checkpoint's profiles {', '.join(f'{s:g}' for s in sigma_rels)} (profile fit error {error:.1%})")
    return {**ckpt, "ema": ema, "ema_name": f"power EMA {sigma_rel:g}"}


def schedule_text(cfg):
    betas = (f"betas {cfg.beta_start:g}..{cfg.beta_end:g}" if cfg.schedule_type == "linear" else f"s {cfg.cosine_s:g}")
    return f"T={cfg.timesteps} {cfg.schedule_type}, {betas}"


def read_guide(path, ema_length, cfg, class_names):
    """(checkpoint dict, name) of an autoguidance guide (--guide, --guide_ema_length), refused in one
    line unless it denoises the same task as the model it guides: the same image size, noise
    schedule and classes. Its size and training may differ: a weaker model is the point."""
    where = resolve_checkpoint_path(path)
    guide = read_checkpoint(where)
    guide_cfg, guide_classes = config_from_dict(guide["config"]), list(guide.get("class_names") or ())
    differences = [f"{what} {theirs} where the model has {ours}" for what, theirs, ours in (
        ("image size", guide_cfg.image_size, cfg.image_size),
        ("schedule", schedule_text(guide_cfg), schedule_text(cfg)),
        ("classes", ", ".join(guide_classes) or "none", ", ".join(class_names) or "none")) if theirs != ours]
    if differences:
        raise UserError(f"--guide {path} does not match the model it would guide: it has {'; '.join(differences)}")
    if ema_length:
        guide = posthoc_ema(guide, where.parent, ema_length)
    return guide, where.stem + (f"_ema{ema_length:g}" if ema_length else "")


def _read_snapshot(path, sigma_rels):
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"EMA snapshot {path} is unreadable ({_load_failure_reason(e)}); move it away to rebuild "
                        f"--ema_length from the others") from None
    if snapshot.get("sigma_rels") != list(sigma_rels):
        raise UserError(f"EMA snapshot {path} holds the profiles {snapshot.get('sigma_rels')}, not the "
                        f"checkpoint's {list(sigma_rels)}: it belongs to another run")
    return snapshot["models"]


def check_writable_folder(folder, flag):
    """Refuse (before any work) a folder that cannot be created or written: a file in its way, or
    no write permission on the nearest folder that exists."""
    folder = existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: no permission to write in {existing}")


@dataclass(frozen=True)
class SampleConfig:
    """What --mode sample and eval draw and write, parsed once: their flags are made from these
    fields as the training flags are from Config's. The training flags they share come last, None
    where not given (the checkpoint's value, or auto)."""
    checkpoint: str = _field(None, "checkpoint file, a run folder meaning its newest checkpoint, or a diffusers "
                                   "DDPMPipeline or UNet2DModel folder")
    num_samples: int = _field(None, "images to generate (sample: 64, eval: 10000)")
    sampler: str = _field("ddpm", "ddpm: ancestral (Ho et al.); ddim: Song et al.; dpmpp2m: DPM-Solver++(2M), "
                                  "10-50 steps", choices=tuple(SAMPLERS))
    sampling_steps: int = _field(None, "K <= T evenly strided steps (default T)")
    timestep_spacing: str = _field(None, "which K of the T steps to visit (default: uniform for ddpm/ddim, logsnr "
                                         "for dpmpp2m)", choices=TIMESTEP_SPACINGS)
    eta: float = _field(0.0, "DDIM noise: 0 deterministic, 1 DDPM-like")
    var_type: str = _field("fixedlarge", "DDPM reverse variance: beta_t (paper's CIFAR-10 choice) or the posterior's",
                           choices=VAR_TYPES)
    no_ema: bool = _field(False, "sample with the raw weights instead of the EMA")
    ema_length: float = _field(None, "sample with the power EMA of this relative length, rebuilt from the "
                                     "snapshots of a run trained with --ema_profiles (EDM2's post-hoc EMA)",
                               metavar="SIGMA_REL")
    trajectory: bool = _field(False, "also write <stem>_trajectory.png: for 4 samples, x_t and the predicted x_0 at "
                                     "10 points of the chain, from noise to image")
    nearest: int = _field(None, "also write <stem>_nearest.png: the first 10 samples, each beside its K nearest "
                                "training images (L2 in Inception pool3 space with pytorch-fid and its weights, else "
                                "in pixels), to see whether the model copies its data", metavar="K")
    class_label: str = _field(None, "class-conditional checkpoints: the class to generate, or all (the default): an "
                                    "equal number of every class, in class order; --guidance_scale sets w",
                              metavar="NAME|INDEX|all")
    out: str = _field(None, "output folder (default samples/<run>/)")
    export_safetensors: str = _field(None, "write the checkpoint's sampling weights (EMA unless --no_ema) and config "
                                           "to a .safetensors file (pip install safetensors) instead of sampling; "
                                           "--checkpoint reads such files too", metavar="FILE")
    export_diffusers: str = _field(None, "write the sampling weights (EMA unless --no_ema) and the schedule as a "
                                         "diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler; pip install "
                                         "safetensors) instead of sampling; --checkpoint reads such folders too",
                                   metavar="DIR")
    eval_npz: str = _field(None, "score the uint8 (N, H, W, 3) images in this .npz instead of generating",
                           metavar="FILE")
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    device: Optional[str] = None
    amp: Optional[str] = None
    channels_last: Optional[str] = None
    clip_x0: Optional[str] = None
    guidance_scale: Optional[float] = None
    guide: Optional[str] = None
    guide_ema_length: Optional[float] = None
    data_dir: Optional[str] = None
    fid_weights: Optional[str] = None
    dataset: Optional[str] = None
    image_size: Optional[int] = None

    @classmethod
    def of(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def read(self):
        """(path, checkpoint dict) of --checkpoint, its EMA rebuilt at --ema_length when given."""
        path = resolve_checkpoint_path(self.checkpoint)
        ckpt = read_checkpoint(path)
        if self.ema_length is None:
            return path, ckpt
        if self.no_ema:
            raise UserError("--ema_length chooses an EMA and --no_ema the raw weights; give one of them")
        return path, posthoc_ema(ckpt, path.parent, self.ema_length)

    def read_guide(self, ckpt):
        """(checkpoint dict, name) of --guide, checked against the model it guides, or (None, "")."""
        if self.guide_ema_length and not self.guide:
            raise UserError("--guide_ema_length needs --guide")
        if not self.guide:
            return None, ""
        if self.guide_ema_length is not None and not 0 <= self.guide_ema_length < MAX_SIGMA_REL:
            raise UserError(f"--guide_ema_length must be in [0, {MAX_SIGMA_REL:.4f})")
        return read_guide(self.guide, self.guide_ema_length, config_from_dict(ckpt["config"]),
                          list(ckpt.get("class_names") or ()))

    def load(self, ckpt, device, ema=None):
        """(model, diffusion) of a checkpoint read: its EMA weights unless --no_ema (or ema=False), --amp
        and --channels_last."""
        amp, layout = self.amp or "auto", self.channels_last or "auto"
        return model_from_checkpoint(ckpt, not self.no_ema if ema is None else ema, device, amp, layout)[:2]


def unique_stem(folder, stem):
    """stem, or stem_2, stem_3, ... so earlier samples are never overwritten."""
    candidate, k = stem, 1
    while any(Path(folder).glob(f"{candidate}*")):
        k += 1
        candidate = f"{stem}_{k}"
    return candidate


class SamplingJob(NamedTuple):
    """What --mode sample and eval, and FID during training, draw: the model's config, the
    SamplingSpec, the labels (N,) or None, the seed, the classes' name in file names and FID logs
    ("" without classes), the number of images, made batch_size at a time, and the guide model of
    autoguidance (the spec names it) or None."""
    cfg: Config
    spec: SamplingSpec
    classes: Optional[torch.Tensor]
    seed: int
    class_label: str
    num_samples: int
    batch_size: int
    guide: Optional[nn.Module] = None

    def draw(self, model, diffusion, procs=Processes()):
        """The images, uint8 (N, H, W, 3) (see generate_samples)."""
        shape = (self.num_samples, 3, self.cfg.image_size, self.cfg.image_size)
        return generate_samples(model, diffusion, self.spec, shape, self.seed, self.batch_size, self.classes, procs,
                                self.guide)

    def fid_info(self, model, **columns):
        """`columns` and the sampling columns of a fid_log.csv row for these images of `model`."""
        spec = self.spec
        if spec.guide:
            columns["source"] = f"{columns.get('source', '')}, guided by {spec.guide}"
        return dict(columns, sampler=spec.sampler, steps=spec.steps, spacing=spec.grid_spacing, clip=spec.clip_x0,
                    eta=spec.eta, classes=self.class_label, precision=precision_name(model.dtype),
                    guidance_scale=f"{spec.guidance_scale:g}" if self.class_label or spec.guide else "")


def sampling_job(args, ckpt, num_samples, guide=""):
    """The SamplingJob of the flags, each checked before any work (--sampling_steps against the checkpoint's T):
    a flag left out takes the checkpoint's value (seed, --clip_x0, --guidance_scale) or the default. `guide`
    names the guide of autoguidance (its model is set into the job once loaded)."""
    cfg = config_from_dict(ckpt["config"])
    if args.eta < 0:
        raise UserError("--eta must be >= 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    steps = args.sampling_steps or cfg.timesteps
    if not 1 <= steps <= cfg.timesteps:
        raise UserError(f"--sampling_steps must be in 1..{cfg.timesteps} (the checkpoint's timesteps)")
    classes, scale = sampling_classes(args, ckpt, cfg, num_samples, bool(guide))
    spec = SamplingSpec(args.sampler, steps, args.timestep_spacing or "", args.eta, args.var_type,
                        cfg.clip_x0 if args.clip_x0 is None else args.clip_x0, scale, guide)
    return SamplingJob(cfg, spec, classes, cfg.seed if args.seed is None else args.seed,
                       "" if classes is None else args.class_label or "all", num_samples, args.batch_size or 128)


def sampling_classes(args, ckpt, cfg, num_samples, guided=False):
    """(labels (N,) or None, guidance scale) for --class_label and --guidance_scale, checked before any
    work: 'all' (the default of a class-conditional model) is every class in class order, as equally
    often as N allows; a name or an index is that class alone. w is --guidance_scale, else the
    checkpoint's where it was trained with guidance of this kind (autoguidance when `guided`,
    classifier-free guidance without), else 1."""
    names = list(ckpt.get("class_names") or ())
    if args.guidance_scale is not None:
        scale = args.guidance_scale
    elif guided and not cfg.guide:
        raise UserError("--guide needs --guidance_scale W, the weight of autoguidance (e.g. 2; 1 = the model alone)")
    else:
        scale = cfg.guidance_scale if guided or (names and not cfg.guide) else 1.0
    if scale < 0:
        raise UserError("--guidance_scale must be at least 0")
    if not names:
        if args.class_label is not None:
            raise UserError("--class_label needs a class-conditional checkpoint (trained with --class_conditional); "
                            "this one is unconditional")
        if scale != 1 and not guided:
            raise UserError("--guidance_scale needs a class-conditional checkpoint (trained with --class_conditional) "
                            "or a --guide (autoguidance); this one is unconditional")
        return None, scale
    label = "all" if args.class_label is None else args.class_label
    if label == "all":  # class by class; where N is not a multiple, the first N mod C classes get one more
        counts = [num_samples // len(names) + (c < num_samples % len(names)) for c in range(len(names))]
        return torch.arange(len(names)).repeat_interleave(torch.tensor(counts)), scale
    if label.lstrip("-").isdigit():
        index = int(label)
        if not 0 <= index < len(names):
            raise UserError(f"--class_label {index} is out of range: the classes are 0..{len(names) - 1} "
                            f"({', '.join(names)})")
    elif label in names:
        index = names.index(label)
    else:
        raise UserError(f"--class_label {label!r} is not a class of this model; choose from {', '.join(names)}, "
                        f"an index 0..{len(names) - 1}, or all")
    return torch.full((num_samples,), index), scale


def export_weights(args, ckpt):
    """--export_safetensors FILE and --export_diffusers DIR: the sampling weights (EMA unless --no_ema)
    in another format. Everything is checked before anything is written."""
    weights = sampling_weights(ckpt, not args.no_ema)
    if args.export_safetensors:
        out = Path(args.export_safetensors)
        if out.suffix != ".safetensors":
            raise UserError(f"--export_safetensors {out} must end in .safetensors")
        check_writable_folder(out.parent, "--export_safetensors")
        if out.exists():
            raise UserError(f"{out} already exists; choose another file name")
    if args.export_diffusers:
        folder = Path(args.export_diffusers)
        check_writable_folder(folder.parent, "--export_diffusers")
        if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
            raise UserError(f"--export_diffusers {folder} already exists; choose a new folder")
        if ckpt.get("class_names"):
            raise UserError("cannot export a class-conditional model to diffusers: this exporter writes "
                            "UNet2DModel without a class embedding; use --export_safetensors")
        diffusers_configs(config_from_dict(ckpt["config"]))  # refuses what UNet2DModel cannot express
    _safetensors()
    if args.export_safetensors:
        export_safetensors(ckpt, out, use_ema=not args.no_ema)
        print(f"wrote {out} ({weights} weights and the config); sample from it with --checkpoint {out}")
    if args.export_diffusers:
        export_diffusers(ckpt, folder, use_ema=not args.no_ema)
        print(f"wrote {folder}/ ({weights} weights, the UNet2DModel and DDPMScheduler configs); load it with "
              f"diffusers.DDPMPipeline.from_pretrained({str(folder)!r}) or sample from it with --checkpoint {folder}")


def write_trajectory(model, diffusion, job, path):
    """--trajectory: the first (at most 4) images of the job's first batch drawn again, with x_t and the
    predicted x_0 (held in [-1, 1]) at every step of the chain kept by a callback: how a sample forms."""
    rows, points = min(4, job.num_samples), []
    record = lambda step, t, x_t, x0: points.append((t, x_t.cpu(), x0.clamp(-1, 1).cpu()))  # noqa: E731
    generator = torch.Generator(device=diffusion.betas.device).manual_seed(derived_seed(job.seed, 0, SAMPLE_BATCH))
    final = diffusion.sample(model, (rows, 3, job.cfg.image_size, job.cfg.image_size), job.spec, generator=generator,
                             classes=None if job.classes is None else job.classes[:rows], callback=record)
    save_trajectory(points, final.cpu(), path)
    print(f"wrote {path}")


def run_sample(args):
    """--mode sample (a SampleConfig): images of a checkpoint as PNGs, an .npz and a grid."""
    if not args.checkpoint:
        raise UserError("--mode sample needs --checkpoint PATH (a .pt file, a run folder or a diffusers folder)")
    from PIL import Image
    args = dataclasses.replace(args, num_samples=64 if args.num_samples is None else args.num_samples)
    if args.num_samples < 1:
        raise UserError("--num_samples must be at least 1")
    if args.nearest is not None and args.nearest < 1:
        raise UserError("--nearest K needs K >= 1 training images per sample")
    path, ckpt = args.read()
    if args.export_safetensors or args.export_diffusers:
        if torchrun_processes().main:
            export_weights(args, ckpt)
        return
    guide, guide_name = args.read_guide(ckpt)
    job = sampling_job(args, ckpt, args.num_samples, guide_name)
    cfg, spec, classes = job.cfg, job.spec, job.classes
    if args.out:
        check_writable_folder(args.out, "--out")
    device, procs = init_processes(args.device or "auto")
    model, diffusion = args.load(ckpt, device)
    job = job._replace(guide=None if guide is None else args.load(guide, device, ema=True)[0])
    out = Path(args.out) if args.out else Path(cfg.samples_dir) / cfg.run_name
    print(f"{path}: {cfg.run_name}, T={cfg.timesteps} {cfg.schedule_type}, "
          f"{sampling_weights(ckpt, not args.no_ema)} weights, {count_parameters(model) / 1e6:.2f}M parameters"
          f"{f', autoguided by {args.guide} ({count_parameters(job.guide) / 1e6:.2f}M) at w = {spec.guidance_scale:g}' if guide else ''}")

    images = job.draw(model, diffusion, procs)
    if not procs.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    names = list(ckpt.get("class_names") or ())
    ema = "" if args.ema_length is None else f"_ema{args.ema_length:g}"
    stem = unique_stem(out, f"samples_{spec.name(job.class_label)}{ema}_seed{job.seed}")
    np.savez(out / f"{stem}.npz", images)  # arr_0: uint8 (N, H, W, 3)
    folder = out / stem
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    drawn, counts = (None, None) if classes is None else (t.tolist() for t in classes.unique(return_counts=True))
    if job.class_label == "all":  # a row per class drawn, named
        rows = np.concatenate([images[classes.numpy() == c][:min(10, *counts)] for c in drawn])
        save_grid(as_float(rows), out / f"{stem}_grid.png", [names[c] for c in drawn], guidance_title(spec))
    else:
        save_grid(as_float(images[:100]), out / f"{stem}_grid.png")
    if classes is not None:
        np.save(out / f"{stem}_labels.npy", classes.numpy())
        held = ", ".join(f"{names[c]} x{n}" for c, n in zip(drawn, counts))
        print(f"classes of {stem}/: {held} (file by file in {stem}_labels.npy)")
    if args.nearest:
        write_nearest(args, cfg, images[:10], out / f"{stem}_nearest.png", device)
    if args.trajectory:
        write_trajectory(model, diffusion, job, out / f"{stem}_trajectory.png")
    print(f"wrote {len(images)} images: {out / (stem + '_grid.png')}, {folder}/, {out / (stem + '.npz')}")


def write_nearest(args, cfg, samples, path, device):
    """--nearest K: samples beside their nearest training images, in Inception space when it can be
    had (pytorch-fid and its weights), else in pixels; the picture's title says which."""
    train, _ = reference_images(cfg, args.data_dir or cfg.data_dir)
    try:
        extractor = build_fid_inception(args.fid_weights or None, device)
        space = "Inception pool3"
        features = lambda images: compute_activations(images, extractor, device=device, progress=False)  # noqa: E731
    except UserError as e:
        print(f"note: nearest neighbours in pixel space ({e})")
        space, features = "pixels", pixel_features
    indices, distances = nearest_neighbours(samples, train, args.nearest, features)
    save_nearest_picture(samples, train, indices, path, f"sample | {indices.shape[1]} nearest training images "
                                                          f"(L2, {space})")
    print(f"wrote {path}: nearest training images in {space}, distances {distances[:, 0].min():.3g} to "
          f"{distances[:, 0].max():.3g} for the nearest")


def load_npz_images(path):
    path = Path(path)
    try:
        with np.load(path) as f:
            images = f["arr_0"] if "arr_0" in f else f[f.files[0]]
    except Exception as e:
        raise UserError(f"--eval_npz {path} is not a readable .npz of images ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"--eval_npz {path} must hold uint8 images (N, H, W, 3), not {images.dtype} {images.shape}")
    return images


def run_eval(args):
    """--mode eval: FID and KID of a checkpoint's samples (or of --eval_npz) against its training set."""
    if not args.checkpoint and not args.eval_npz:
        raise UserError("--mode eval needs --checkpoint PATH (to generate samples) or --eval_npz FILE")
    num_samples = args.num_samples or 10_000
    if num_samples < 2:
        raise UserError("--num_samples must be at least 2 for FID")
    device, procs = init_processes(args.device or "auto")
    if args.checkpoint:
        path, ckpt = args.read()
        run_dir, step = path if path.is_dir() else path.parent, ckpt["step"]
        guide, guide_name = args.read_guide(ckpt)
        job = sampling_job(args, ckpt, num_samples, guide_name)
        cfg = job.cfg
    else:
        path, step, run_dir = None, "", Path(args.eval_npz).parent
        cfg = Config(**{k: getattr(args, k) for k in ("dataset", "image_size") if getattr(args, k) is not None})
    extractor = build_fid_inception(args.fid_weights or None, device)  # fails fast without pytorch-fid
    if args.eval_npz:
        images = load_npz_images(args.eval_npz)
        info = dict(checkpoint=path or "", step=step, source=args.eval_npz)
    else:
        model, diffusion = args.load(ckpt, device)
        job = job._replace(guide=None if guide is None else args.load(guide, device, ema=True)[0])
        images = job.draw(model, diffusion, procs)
        info = job.fid_info(model, checkpoint=path, step=step, source=sampling_weights(ckpt, not args.no_ema))
    if not procs.main:
        return
    reference, name = reference_images(cfg, args.data_dir or cfg.data_dir)
    scores = evaluate_fid(images, reference, name, extractor, run_dir, info, device)
    how = (f"{info['sampler']} {info['steps']} steps, {info['precision']}" if "sampler" in info
           else f"from {args.eval_npz}")
    print(f"FID {scores['fid']:.2f}  KID {scores['kid'] * 1e3:.2f} +- {scores['kid_std'] * 1e3:.2f} (x1e-3)  |  "
          f"FID@{len(images):,}: {len(images):,} samples ({how}) vs {name} ({scores['reference_n']:,} images)"
          f"{f', checkpoint step {step:,}' if step != '' else ''}")
    if len(images) < 50_000:
        print(f"note: FID falls as N grows; compare only FIDs with the same N (published CIFAR-10 FIDs, such as "
              f"the paper's 3.17, use N=50,000). Logged to {run_dir / 'fid_log.csv'}")


# --- CLI: parser, interactive menu, main() ----------------------------------------------------------

def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def field_parser(f):
    """The function turning a flag's (or the menu's) text into this field's value (an alias such as
    --scheduler none into the name it stands for, so that checkpoints hold one spelling)."""
    item, aliases = f.metadata.get("item", int), f.metadata.get("value_aliases", {})
    as_tuple = lambda text: tuple(item(p) for p in str(text).replace(",", " ").split())  # noqa: E731
    as_str = lambda text: aliases.get(text, text)  # noqa: E731
    return {bool: parse_bool, tuple: as_tuple, int: int, float: float}.get(type(f.default), as_str)


def _typed(parse, name):
    def convert(text):
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} for --{name}") from None
    convert.__name__ = name
    return convert


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (no usage block) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineErrorParser(prog="train_ddpm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=("train", "sample", "eval", "lr_find"), default="train",
                        help="train a model, sample images from a checkpoint, eval: FID and KID of its samples, or "
                             "lr_find: the loss against an exponentially rising LR, and a suggested --learning_rate")
    parser.add_argument("--resume", metavar="latest|auto|PATH",
                        help="continue a run: 'latest' (newest checkpoint of --run_name), 'auto' (latest, or "
                             "start the run when it has none yet: for cluster jobs) or a checkpoint path")
    train = parser.add_argument_group("training (default: the preset's value; flags win over presets)")
    for f in dataclasses.fields(Config):
        flags = [f"--{f.name}"] + [f"--{alias}" for alias in f.metadata.get("aliases", ())]
        help_text = f"{f.metadata['help']} [default {f.default}]"
        if f.name == "preset":
            train.add_argument(*flags, choices=tuple(PRESETS), default=None, help=help_text)
        elif f.type is bool:
            train.add_argument(*flags, dest=f.name, nargs="?", const=True, default=None, metavar="true|false",
                               type=_typed(parse_bool, f.name), help=help_text)
            train.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            train.add_argument(*flags, dest=f.name, default=None, choices=f.metadata.get("choices"),
                               type=_typed(field_parser(f), f.name), help=help_text)
    parser.add_argument("--num_gpus", type=int, default=None, metavar="N", help="run on N GPUs of this machine: "
                        "relaunches this command under torchrun with DistributedDataParallel (training) or N shards "
                        "of the samples (sample, eval); with --device cpu, N CPU processes")
    finder = parser.add_argument_group("learning-rate finder (--mode lr_find, with the run's training flags)")
    finder.add_argument("--lr_find_steps", type=int, default=200, help="steps of the LR ramp")
    finder.add_argument("--lr_find_min", type=float, default=1e-6, help="the ramp's first LR")
    finder.add_argument("--lr_find_max", type=float, default=1.0, help="the ramp's last LR (it stops early when "
                                                                       "the loss diverges)")
    finder.add_argument("--lr_find_dir", default="lr_find", help="where the plot and CSV go (never a run folder)")
    sample = parser.add_argument_group("sampling (--mode sample)")
    evaluate = parser.add_argument_group("evaluation (--mode eval; needs pip install pytorch-fid)")
    for f in dataclasses.fields(SampleConfig):
        if "help" not in f.metadata:
            continue  # a training flag, above
        group = evaluate if f.name == "eval_npz" else sample
        if f.type is bool:
            group.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            group.add_argument(f"--{f.name}", type=f.type, default=f.default, choices=f.metadata.get("choices"),
                               metavar=f.metadata.get("metavar"), help=f.metadata["help"])
    return parser


def explicit_config(args):
    """The Config fields given on the command line (every training flag defaults to None)."""
    return {name: getattr(args, name) for name in CONFIG_FIELDS if getattr(args, name) is not None}


def preset_config(preset, explicit):
    return Config(**{**PRESETS[preset], "preset": preset, **explicit})


def latest_of_run(explicit):
    """(newest checkpoint or None, run folder) of the run the flags name, for --resume latest."""
    preset = explicit.get("preset", DEFAULT_PRESET)
    base = preset_config(preset, explicit)
    # Without --run_name, look in the default run folder; if a flag such as --timesteps changed
    # that name, also in the preset's own, so the conflict is reported rather than "no checkpoint".
    names = [base.run_name] if base.run_name else [default_run_name(base), default_run_name(preset_config(preset, {}))]
    path = next(filter(None, (find_latest_checkpoint(Path(base.checkpoint_dir) / n) for n in names)), None)
    return path, Path(base.checkpoint_dir) / names[0]


def resume_config(resume, explicit):
    """The config of a resumed run and its checkpoint dict: the checkpoint's config, with only the
    flags that may change on resume applied; a flag contradicting the checkpoint is an error."""
    if resume == "latest":
        path, run_dir = latest_of_run(explicit)
        if path is None:
            raise UserError(f"no checkpoint to resume in {run_dir}; name the run with --run_name, "
                            f"give a checkpoint path to --resume, or use --resume auto to start it when new")
    else:
        path = resolve_checkpoint_path(resume)
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"{path} holds sampling weights only; resume from a .pt training checkpoint")
    saved = config_from_dict(ckpt["config"])
    for name, value in explicit.items():
        if name not in RESUME_MAY_CHANGE and value != getattr(saved, name):
            raise UserError(f"--{name} {value} conflicts with the checkpoint ({name}={getattr(saved, name)}); "
                            f"a resumed run keeps its model, schedule and optimisation settings; start a "
                            f"new run with another --run_name to change them")
    print(f"resuming {path} (step {ckpt['step']}, epoch {ckpt['epoch']})")
    # The checkpoint's folder is the run: keep writing there even if it was moved or renamed.
    cfg = dataclasses.replace(saved, **explicit)
    return dataclasses.replace(cfg, checkpoint_dir=str(path.parent.parent), run_name=path.parent.name), ckpt


def init_from_architecture(explicit):
    """The model and schedule fields of --init_from's checkpoint; a flag that contradicts them is an error."""
    path = resolve_checkpoint_path(explicit["init_from"])
    source = config_from_dict(read_checkpoint(path)["config"])
    for name in ARCHITECTURE_FIELDS:
        if name in explicit and explicit[name] != getattr(source, name):
            raise UserError(f"--{name} {_show(explicit[name])} conflicts with --init_from {path} "
                            f"({name}={_show(getattr(source, name))}); the model and schedule come from it")
    return {name: getattr(source, name) for name in ARCHITECTURE_FIELDS}


def ask_until_valid(prompt, parse, ask):
    while True:
        answer = ask(prompt).strip()
        try:
            return parse(answer)
        except (ValueError, UserError) as e:
            print(f"  {e}; try again")


CIFAR10_TRAIN_IMAGES = 50_000


def training_flops_per_image(cfg):
    """FLOPs of training on one image: the UNet's forward as PyTorch's FlopCounterMode counts it on
    meta tensors (convolutions, matmuls and attention as matmuls; no memory, no weights), times 3
    for forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(cfg, num_classes=10 if cfg.class_conditional else 0)
        x, t = torch.zeros(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t)
    return 3 * counter.get_total_flops()


def fresh_training_parts(cfg, device, num_classes=0):
    """(forward, diffusion, optimizer, scaler) of a new model of cfg, placed and called as training
    places and calls it (layout, precision; never compiled): for the menu's timing and lr_find."""
    channels_last, amp_dtype = use_channels_last(cfg.channels_last, device), autocast_dtype(cfg.amp, device)
    model = place_model(build_model(cfg, num_classes), device, channels_last).train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return (Precision(model, device, amp_dtype, channels_last), build_diffusion(cfg).to(device),
            build_optimizer(model, cfg), scaler)


def measure_training_rate(device):
    """(FLOP/s, preset) this machine trains at: two timed train_steps, after one untimed, of the
    cpu_hour UNet on a CPU, or of cifar10_optimized's on a GPU, at those presets' batch sizes and
    in the precision and layout they get here."""
    name = "cpu_hour" if device.type == "cpu" else "cifar10_optimized"
    cfg = preset_config(name, {})
    forward, diffusion, optimizer, scaler = fresh_training_parts(cfg, device)
    batch = cfg.batch_size
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    step = Batch(torch.zeros(shape, device=device), torch.arange(batch, device=device) * 31 % cfg.timesteps,
                 torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device), None)
    grad_norm, _, _ = train_step(forward, diffusion, step, optimizer, scaler, cfg.grad_clip)  # untimed: set-up
    grad_norm.item()  # waits for the GPU
    start = time.perf_counter()
    for _ in range(2):
        grad_norm, _, _ = train_step(forward, diffusion, step, optimizer, scaler, cfg.grad_clip)
    grad_norm.item()
    return training_flops_per_image(cfg) * batch * 2 / (time.perf_counter() - start), name


def estimated_seconds(cfg, flops_per_second):
    """How long a run of cfg trains at this rate: its planned images on CIFAR-10 (or its
    --train_subset) times its FLOPs per image; --max_minutes caps it."""
    images_per_epoch = cfg.train_subset or CIFAR10_TRAIN_IMAGES
    images = planned_steps(cfg, steps_per_epoch(images_per_epoch, cfg.batch_size)) * cfg.batch_size
    seconds = training_flops_per_image(cfg) * images / flops_per_second
    return min(seconds, 60 * cfg.max_minutes) if cfg.max_minutes else seconds


def preset_time_here(name, flags, rate):
    """'about N days here' for the preset with these flags, or why not (flags it does not take)."""
    try:
        return f"{duration_text(estimated_seconds(preset_config(name, flags), rate))} here"
    except (UserError, ValueError, RuntimeError):
        return "time here unknown with these flags"


def duration_text(seconds):
    for unit, length in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= 1.5 * length or unit == "minute":
            count = max(1, round(seconds / length))
            return f"about {count} {unit}{'s' if count > 1 else ''}"


def menu_default_preset(has_cuda):
    """The menu's Enter choice: the recommended start on a GPU; without one, the preset made for an
    hour of a CPU (the others take days there). Runs without a menu keep DEFAULT_PRESET, so that a
    command means the same run on every machine."""
    return DEFAULT_PRESET if has_cuda else "cpu_hour"


def interactive_config(explicit, ask=input):
    """A numbered preset menu with each preset's estimated training time on this machine, then each
    main hyperparameter with its default (Enter keeps it). Fields given as flags are not asked."""
    names, device = list(PRESETS), pick_device(explicit.get("device", "auto"))
    print("timing two training steps to estimate each preset's time on this machine...", flush=True)
    rate, timed = measure_training_rate(device)
    default = menu_default_preset(device.type == "cuda")
    print(f"Presets (time here: each preset's training FLOPs at the {rate / 1e9:.0f} GFLOP/s that 2 steps of "
          f"{timed}'s UNet just took on this {'GPU' if device.type == 'cuda' else 'CPU'}):")
    flags = {k: v for k, v in explicit.items() if k != "preset"}  # --epochs 10 changes every preset's time
    for i, name in enumerate(names, 1):
        print(f"  {i}. {name:<18} {preset_summary(name)}; {preset_time_here(name, flags, rate)}")
    default_index = names.index(default) + 1

    def parse_choice(answer):
        if answer in PRESETS or not answer:
            return answer or default
        if answer.isdigit() and 1 <= int(answer) <= len(names):
            return names[int(answer) - 1]
        raise ValueError(f"choose 1-{len(names)} or a preset name")

    preset = explicit.get("preset") or ask_until_valid(
        f"Choose a preset [1-{len(names)}, Enter = {default_index} {default}]: ", parse_choice, ask)
    cfg = preset_config(preset, explicit)
    print(f"Settings for {preset} (Enter keeps the value in brackets):")
    for name in [name for name in MENU_FIELDS if name not in explicit]:
        f, current = CONFIG_FIELDS[name], getattr(cfg, name)
        choices = f.metadata.get("choices")
        hint = f" ({'/'.join(choices)})" if choices else ""

        def parse_value(answer, name=name, f=f, current=current, choices=choices):
            if answer == "":
                return current
            value = field_parser(f)(answer)
            if choices and value not in choices:
                raise ValueError(f"choose one of {', '.join(choices)}")
            validate_config(dataclasses.replace(cfg, **{name: value}))
            return value

        value = ask_until_valid(f"  {name}{hint} - {f.metadata['help']} [{_show(current)}]: ", parse_value, ask)
        cfg = dataclasses.replace(cfg, **{name: value})
    return cfg


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resolve_train_config(args):
    """Config (and checkpoint dict on resume) from flags, preset, menu and checkpoint."""
    explicit = explicit_config(args)
    resume = args.resume
    if resume == "auto":  # one command for a cluster job's first start and every requeue
        resume = "latest" if latest_of_run(explicit)[0] is not None else None
        if resume is None and torchrun_processes().main:
            print("--resume auto: no checkpoint of this run yet, starting it")
    if explicit.get("init_from") and not resume:
        explicit = {**explicit, **init_from_architecture(explicit)}
    if resume:
        cfg, ckpt = resume_config(resume, explicit)
    elif "preset" not in explicit and sys.stdin.isatty() and torchrun_processes().world == 1:
        cfg, ckpt = interactive_config(explicit), None
    else:
        cfg, ckpt = preset_config(explicit.get("preset", DEFAULT_PRESET), explicit), None
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=default_run_name(cfg))
    validate_config(cfg)
    check_writable_folder(Path(cfg.checkpoint_dir) / cfg.run_name, "--checkpoint_dir")
    check_writable_folder(Path(cfg.samples_dir) / cfg.run_name, "--samples_dir")
    return cfg, ckpt


def launch_processes(args, argv):
    """--num_gpus N: run this same command as N torchrun workers on this machine. Everything is
    checked here first, and a menu's answers are passed on as flags, so the workers ask nothing."""
    device = pick_device(args.device or "auto")
    if device.type == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise UserError(f"--num_gpus {args.num_gpus} but this machine has {torch.cuda.device_count()} GPUs")
    extra = []
    if args.mode == "train":
        cfg, ckpt = resolve_train_config(args)
        if cfg.batch_size % args.num_gpus:
            raise UserError(f"--batch_size {cfg.batch_size} must be a multiple of --num_gpus {args.num_gpus}")
        if ckpt is None:
            preset = preset_config(cfg.preset, {})
            changed = [name for name in CONFIG_FIELDS if getattr(cfg, name) != getattr(preset, name)]
            extra = ["--preset", cfg.preset, *(arg for n in changed for arg in (f"--{n}", _show(getattr(cfg, n))))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.num_gpus}",
               str(Path(__file__).resolve()), *argv, *extra]
    print(f"launching {args.num_gpus} processes with torchrun --standalone --nproc_per_node={args.num_gpus}",
          flush=True)
    os.execv(sys.executable, command)  # torchrun takes this process over: Ctrl-C and SIGTERM reach it


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    procs = torchrun_processes()
    if not procs.main:  # rank 0 speaks for all; the others print only a crash
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *error: traceback.print_exception(*error, file=sys.__stderr__)
    try:
        if args.mode == "lr_find" and (args.num_gpus is not None or args.resume):
            raise UserError("--mode lr_find ramps one fresh model in one process: leave out --num_gpus and --resume")
        if args.num_gpus is not None:
            if args.num_gpus < 1:
                raise UserError("--num_gpus must be at least 1")
            if procs.world > 1 and args.num_gpus != procs.world:
                raise UserError(f"--num_gpus {args.num_gpus} but torchrun started {procs.world} processes; "
                                f"leave out --num_gpus under torchrun")
            if args.num_gpus > 1 and procs.world == 1:
                return launch_processes(args, argv)
        if args.mode == "sample":
            run_sample(SampleConfig.of(args))
        elif args.mode == "eval":
            run_eval(SampleConfig.of(args))
        elif args.mode == "lr_find":
            run_lr_find(args)
        else:
            cfg, ckpt = resolve_train_config(args)
            width = max(map(len, CONFIG_FIELDS))
            print("Config:", *(f"  {name:<{width}} {_show(getattr(cfg, name))}" for name in CONFIG_FIELDS), sep="\n")
            if warning := schedule_warning(cfg):
                print(warning, file=sys.stderr)
            last = train(cfg, resume_from=ckpt)
            print(f"done; last checkpoint {last}")
            print(f"plot the loss: python plot_loss.py {Path(cfg.checkpoint_dir) / cfg.run_name}")
            if last:
                print(f"sample it: {sample_command(cfg, last)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


# --- Extras: pictures ------------------------------------------------------------------------------

def guidance_title(spec):
    return f"w = {spec.guidance_scale:g}" + (f", autoguided by {spec.guide}" if spec.guide else "")


def save_grid(images, path, row_names=(), title=""):
    """A grid PNG of images in [-1, 1], at most 10 per row (legible at 32px); given row_names, one row
    per name (len(images) / len(row_names) each), with the names written left of their rows and the
    title above, so the picture explains itself."""
    if not row_names:
        import torchvision
        grid, nrow = (images.float().clamp(-1, 1) + 1) / 2, min(10, len(images))
        return atomic_write(path, lambda f: torchvision.utils.save_image(grid, f, nrow=nrow, format="png"))
    from PIL import Image, ImageDraw
    per_row, size = len(images) // len(row_names), images.shape[-1]
    pixels = to_uint8(images.float())
    margin, top = 6 * max(len(name) for name in row_names) + 8, 14 if title else 0
    canvas = Image.new("RGB", (margin + per_row * (size + 2), top + len(row_names) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill="black")
    for r, name in enumerate(row_names):
        draw.text((2, top + r * (size + 2) + size // 2 - 5), name, fill="black")
        for c in range(per_row):
            canvas.paste(Image.fromarray(pixels[r * per_row + c]), (margin + c * (size + 2), top + r * (size + 2)))
    atomic_write(path, lambda f: canvas.save(f, format="png"))


def save_trajectory(points, final, path, columns=10):
    """One PNG: for each sample a row of x_t and, under it, a row of the predicted x_0, at `columns`
    evenly spread calls of the sampler (the first is pure noise), then the finished image; the
    timestep of every column is written above it."""
    from PIL import Image, ImageDraw
    picks = sorted({round(i * (len(points) - 1) / max(columns - 1, 1)) for i in range(columns)})
    size, gap, top, margin = final.shape[-1], 2, 14, 30
    cols = [(f"t={points[i][0]}", points[i][1], points[i][2]) for i in picks] + [("final", final, final)]
    canvas = Image.new("RGB", (margin + len(cols) * (size + gap), top + 2 * len(final) * (size + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, x_t, x0) in enumerate(cols):
        left = margin + c * (size + gap)
        draw.text((left, 1), label[:6], fill="black")
        for r in range(len(final)):
            for k, images in enumerate((x_t, x0)):
                tile = Image.fromarray(to_uint8(images[r:r + 1].float())[0])
                canvas.paste(tile, (left, top + (2 * r + k) * (size + gap)))
    for row, label in enumerate(["x_t", "x0^"] * len(final)):
        draw.text((2, top + row * (size + gap) + size // 2 - 5), label, fill="black")
    atomic_write(path, lambda f: canvas.save(f, format="png"))


def save_nearest_picture(samples, train, indices, path, title):
    """Each sample (a row) beside its nearest training images, nearest first, under a title."""
    from PIL import Image, ImageDraw
    size, gap, top = samples.shape[1], 2, 14
    canvas = Image.new("RGB", ((indices.shape[1] + 1) * (size + gap) + 6, top + len(samples) * (size + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    for r, (sample, row) in enumerate(zip(samples, indices)):
        canvas.paste(Image.fromarray(sample), (0, top + r * (size + gap)))
        for c, i in enumerate(row):  # a 6-pixel gap sets the sample apart from the training images
            canvas.paste(Image.fromarray(train[i]), (6 + (c + 1) * (size + gap), top + r * (size + gap)))
    atomic_write(path, lambda f: canvas.save(f, format="png"))


# --- Extras: the learning-rate finder (--mode lr_find) -------------------------------------------

class LRFinding(NamedTuple):
    """One exponential LR ramp: the LR and loss of every step, the smoothed loss, and the two LRs it
    names (None when the loss never fell)."""
    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggested: Optional[float]
    largest_stable: Optional[float]


def running_loss(losses, beta=0.9):
    """The ramp's loss so far, an exponential moving average with its start-up bias divided out (as
    fastai's finder keeps it), to stop the ramp once it diverges."""
    average = 0.0
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
    return average / (1 - beta ** len(losses))


def centered_mean(values, half):
    """The mean of values[i - half : i + half + 1] at each i (fewer at the ends): smoothing that,
    unlike a moving average of the past, does not shift the curve towards larger LRs."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    lo = np.clip(np.arange(len(values)) - half, 0, None)
    hi = np.clip(np.arange(len(values)) + half + 1, None, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def read_lr_ramp(lrs, losses):
    """The largest stable LR, where the smoothed loss is lowest (above it the loss rises: the LR is too
    large to keep training on), and the suggested one: the largest of 1, 2, 5 x 10^k at or below it,
    a margin of 1 to 2.5x. Not the steepest descent of Smith 2017 and fastai: on cpu_hour that rule
    named 7e-4, which trained 10 FID worse than 1e-3 over a quarter hour on both seeds measured
    (BENCHMARKS.md), while the ramp's lowest loss sat at 1.7e-3. Smoothed over a twentieth of the
    ramp, centred. A diverged (non-finite) end is left out."""
    finite = np.isfinite(losses)
    if not finite.all():
        lrs, losses = lrs[:np.argmin(finite)], losses[:np.argmin(finite)]
    if len(losses) < 3:
        return LRFinding(lrs, losses, losses, None, None)
    smoothed = centered_mean(losses, max(2, len(losses) // 40))
    lowest = int(np.argmin(smoothed))
    if lowest < 2:
        return LRFinding(lrs, losses, smoothed, None, None)
    return LRFinding(lrs, losses, smoothed, round_lr_down(float(lrs[lowest])), float(lrs[lowest]))


def round_lr_down(lr):
    """The largest of 1, 2 and 5 x 10^k that is at most lr."""
    power = 10.0 ** math.floor(math.log10(lr))
    return max(m * power for m in (1, 2, 5) if m * power <= lr * (1 + 1e-9))


def lr_ramp(cfg, steps, lr_min, lr_max, device):
    """Train cfg's model from its seed's initialisation on its own data and batch for `steps` steps,
    the LR rising exponentially from lr_min to lr_max, and record each step's loss. One ramp and not
    a short run per LR: the same information in one run's time (Smith 2017). Every step uses the
    same timesteps, evenly covering [0, T), so that the diffusion loss's spread over t does not
    hide the LR's effect. It stops early once the smoothed loss is 4x its lowest (diverged)."""
    torch.manual_seed(cfg.seed)
    data = load_training_data(cfg, Processes(), device)
    forward, diffusion, optimizer, scaler = fresh_training_parts(cfg, device, len(data.class_names))
    t = (torch.arange(cfg.batch_size) * cfg.timesteps // cfg.batch_size).to(device)
    n_batches = steps_per_epoch(len(data.images), cfg.batch_size)
    batches = (batch for epoch in range(steps // n_batches + 1)
               for batch in epoch_batches(data.images, cfg.batch_size, epoch, cfg.seed, cfg.flip, labels=data.labels))
    noise_generator = torch.Generator(device)
    lrs, losses, running = lr_min * (lr_max / lr_min) ** (np.arange(steps) / max(1, steps - 1)), [], []
    for step in tqdm(range(steps), desc="lr_find", unit="step", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[step])
        x_start, y = next(batches)
        noise_generator.manual_seed(derived_seed(cfg.seed, step, BATCH_NOISE))
        noise = torch.randn(x_start.shape, generator=noise_generator, device=device)
        y = drop_labels(y, cfg.class_dropout, cfg.seed, step, cfg.batch_size)
        torch.manual_seed(derived_seed(cfg.seed, step, DROPOUT))
        batch = Batch(x_start, t, noise, y)
        _, step_losses, _ = train_step(forward, diffusion, batch, optimizer, scaler, cfg.grad_clip,
                                       micro_batches=cfg.grad_accum)
        losses.append(float(step_losses.float().mean()))
        running.append(running_loss(losses))
        if not math.isfinite(losses[-1]) or running[-1] > 4 * min(running):
            break
    return read_lr_ramp(lrs[:len(losses)], np.array(losses))


def round_lr(lr):
    return float(f"{lr:.0e}")


def lr_find_table(finding, rows=12):
    """A Markdown table of the smoothed loss at about `rows` LRs evenly spread in log LR."""
    picks = sorted({round(i * (len(finding.lrs) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["| learning rate | loss (smoothed) |", "|---|---|"]
    lines += [f"| {finding.lrs[i]:.2e} | {finding.smoothed[i]:.4f} |" for i in picks]
    return "\n".join(lines)


def save_lr_plot(finding, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(finding.lrs, finding.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss of each step")
    ax.plot(finding.lrs, finding.smoothed, color="tab:blue", linewidth=1.8, label="smoothed")
    for lr, colour, label in ((finding.suggested, "tab:green", "suggested (1-2-5 step below the lowest loss)"),
                              (finding.largest_stable, "tab:red", "largest stable (lowest loss)")):
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", label=f"{label}: {round_lr(lr):g}")
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="loss (MSE of the noise)", title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def run_lr_find(args):
    """--mode lr_find: one LR ramp of the run the flags describe (preset and training flags; no menu),
    its table on stdout, its plot and CSV in --lr_find_dir. No run folder is read or written."""
    explicit = explicit_config(args)
    cfg = preset_config(explicit.get("preset", DEFAULT_PRESET), explicit)
    validate_config(cfg)
    if args.lr_find_steps < 10:
        raise UserError("--lr_find_steps must be at least 10")
    if not 0 < args.lr_find_min < args.lr_find_max:
        raise UserError(f"need 0 < --lr_find_min < --lr_find_max (got {args.lr_find_min:g} and {args.lr_find_max:g})")
    folder = Path(args.lr_find_dir)
    check_writable_folder(folder, "--lr_find_dir")
    device = pick_device(cfg.device)
    set_fast_math(cfg.tf32)
    print(f"lr_find: {cfg.preset} (batch {cfg.batch_size}), LR from {args.lr_find_min:g} to {args.lr_find_max:g} "
          f"over {args.lr_find_steps} steps on {device}")
    finding = lr_ramp(cfg, args.lr_find_steps, args.lr_find_min, args.lr_find_max, device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = unique_stem(folder, f"lr_find_{cfg.run_name or default_run_name(cfg)}")
    rows = [dict(lr=f"{lr:.6g}", loss=f"{loss:.6f}", smoothed=f"{s:.6f}")
            for lr, loss, s in zip(finding.lrs, finding.losses, finding.smoothed)]
    atomic_write_text(csv_text(("lr", "loss", "smoothed"), rows), folder / f"{stem}.csv")
    save_lr_plot(finding, folder / f"{stem}.png", f"{cfg.preset}, batch {cfg.batch_size}: loss against LR")
    print(lr_find_table(finding))
    if finding.suggested is None:
        print(f"the loss did not fall before diverging; rerun with a lower --lr_find_min than {args.lr_find_min:g}")
    else:
        print(f"suggested --learning_rate {finding.suggested:g} (the round LR at or below the largest stable); "
              f"largest stable {round_lr(finding.largest_stable):g} (the lowest loss: above it the loss rises); "
              f"the preset's is {cfg.learning_rate:g}")
    print(f"wrote {folder / stem}.png and .csv")
    return finding


# --- Extras: FID and KID (Inception pool3 features, Frechet distance, kernel distance) --------------

# FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on the 2048-d pool3 features of the
# TensorFlow Inception-v3 of 2015-12-05, as ported by pytorch-fid (the network every published
# CIFAR-10 FID uses). Images enter as uint8 (N, H, W, 3), the layout to_uint8 returns; the network
# sees float (B, 3, H, W) in [0, 1], resized bilinearly to 299 inside, as in pytorch-fid.

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # pytorch_fid.inception.FID_WEIGHTS_URL
FID_EXTRACTOR_NAME = "pt_inception-2015-12-05"  # part of every reference-statistics cache name


class InceptionPool3(nn.Module):
    """(B, 3, H, W) float in [0, 1] -> (B, 2048) pool3 features: pytorch-fid's
    InceptionV3([3], resize_input=True, normalize_input=True) forward, blocks in the same order."""

    def __init__(self, net):
        super().__init__()
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1)))

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.blocks(2 * x - 1).flatten(1)  # [0, 1] -> [-1, 1], as the TF graph expects


def load_fid_weights(weights_path=None):
    """The FID Inception state dict from weights_path, or pytorch-fid's release file (downloaded
    once into torch's hub cache, exactly as pytorch-fid does) when weights_path is None."""
    if weights_path is None:
        try:
            return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location="cpu")
        except Exception as e:  # URLError, HTTPError, SSL and proxy errors alike
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"could not download the FID Inception weights ({reason}); get {FID_WEIGHTS_URL} "
                            f"and pass its path with --fid_weights PATH") from None
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"--fid_weights {path} is not a file; point it at pt_inception-2015-12-05-6726825d.pth")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--fid_weights {path} is not a readable PyTorch state dict ({e})") from None


def build_fid_inception(weights_path=None, device="cpu"):
    """pytorch-fid's FID Inception (its fid_inception_v3 architecture) with weights from a local
    file or the default download, in eval mode, as an InceptionPool3 on device."""
    import torchvision
    try:
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    except ImportError:
        raise UserError("FID needs pytorch-fid, the standard PyTorch port of the TF FID Inception: "
                        "pip install pytorch-fid") from None
    # As pytorch_fid.inception.fid_inception_v3, which we cannot call: it always downloads.
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    blocks = dict(Mixed_5b=FIDInceptionA(192, pool_features=32), Mixed_5c=FIDInceptionA(256, pool_features=64),
                  Mixed_5d=FIDInceptionA(288, pool_features=64), Mixed_6b=FIDInceptionC(768, channels_7x7=128),
                  Mixed_6c=FIDInceptionC(768, channels_7x7=160), Mixed_6d=FIDInceptionC(768, channels_7x7=160),
                  Mixed_6e=FIDInceptionC(768, channels_7x7=192), Mixed_7b=FIDInceptionE_1(1280),
                  Mixed_7c=FIDInceptionE_2(2048))
    for name, block in blocks.items():
        setattr(net, name, block)
    try:
        net.load_state_dict(load_fid_weights(weights_path))
    except (RuntimeError, TypeError) as e:  # other keys or shapes; not a dict at all
        first = str(e).splitlines()[0]
        raise UserError(f"{weights_path or FID_WEIGHTS_URL} does not hold the pytorch-fid Inception weights "
                        f"({first})") from None
    return InceptionPool3(net).to(device).eval().requires_grad_(False)


@torch.no_grad()
def compute_activations(images, extractor, batch_size=100, device="cpu", progress=True):
    """Features of uint8 images (N, H, W, 3) (numpy or torch) as float32 numpy (N, D). extractor maps
    float (B, 3, H, W) in [0, 1] to (B, D); it runs in eval mode, without gradients."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    was_training = extractor.training
    extractor.eval()
    features = []
    with tqdm(total=len(images), desc="inception features", unit="img", leave=False, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
            features.append(extractor(x).reshape(len(x), -1).float().cpu())
            bar.update(len(x))
    extractor.train(was_training)
    return torch.cat(features).numpy()


def nearest_neighbours(queries, references, k, features, batch_size=2000):
    """Indices (n, k) and L2 distances (n, k), nearest first, of each query's k nearest references.
    queries and references are uint8 images (n / N, H, W, 3); features maps a batch of them to
    float32 vectors (n, D). The references pass through in batches with a running top k, so memory
    stays at one batch whatever N."""
    q = torch.from_numpy(features(queries)).double()
    k = min(k, len(references))
    best_d = torch.full((len(q), k), math.inf, dtype=torch.float64)
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    with tqdm(total=len(references), desc="nearest neighbours", unit="img", leave=False,
              disable=len(references) < 5000) as bar:
        for start in range(0, len(references), batch_size):
            r = torch.from_numpy(features(references[start:start + batch_size])).double()
            d = torch.cdist(q, r)
            index = torch.arange(start, start + len(r)).expand(len(q), -1)
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, index], 1)
            best_d, order = d.topk(k, dim=1, largest=False)
            best_i = i.gather(1, order)
            bar.update(len(r))
    return best_i.numpy(), best_d.numpy()


def pixel_features(images):
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255


def activation_statistics(activations):
    """Mean and covariance (float64; unbiased, as np.cov and pytorch-fid) of (N, D) activations."""
    activations = np.asarray(activations)
    if activations.ndim != 2 or len(activations) < 2:
        raise ValueError(f"need at least 2 activations (N, D) for a covariance, got {activations.shape}")
    return activations.mean(axis=0, dtype=np.float64), np.cov(activations, rowvar=False, dtype=np.float64)


def _psd_sqrt(matrix):
    """Symmetric square root of a symmetric PSD matrix; eigenvalues below zero (rounding) count as 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Heusel et al. 2017 eq. 6: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a
    symmetric PSD matrix similar to S1 S2: exact for singular covariances (fewer samples than
    dimensions) where scipy.linalg.sqrtm, which pytorch-fid uses, can return complex noise."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if not (mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def polynomial_mmd2(x, y):
    """Binkowski et al. 2018: unbiased MMD^2 of two equal-size sets (m, d) under the kernel
    k(a, b) = (a.b / d + 1)^3; the diagonal of k(x, x) and k(y, y) is left out, that of k(x, y) is not."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1, features2, subsets=100, subset_size=1000, seed=2020):
    """KID: mean and std over `subsets` random subsets (without replacement) of polynomial_mmd2, as
    torch-fidelity computes it (same defaults and draw order, so the same subsets for the same seed).
    Unlike torch-fidelity, a subset_size above either set's size shrinks to it, as clean-fid does.
    Unbiased, so two sets from one distribution can score slightly below zero."""
    features1, features2 = np.asarray(features1), np.asarray(features2)
    m = min(subset_size, len(features1), len(features2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(features1)} and {len(features2)}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = features1[rng.choice(len(features1), m, replace=False)].astype(np.float64)
        y = features2[rng.choice(len(features2), m, replace=False)].astype(np.float64)
        mmds[i] = polynomial_mmd2(x, y)
    return float(mmds.mean()), float(mmds.std())


# Reference statistics of a training set cost one Inception pass over it (about 75 minutes for
# CIFAR-10's 50,000 images on a laptop CPU), so they are computed once and cached.

class ReferenceStats(NamedTuple):
    mu: np.ndarray          # (D,) float64
    sigma: np.ndarray       # (D, D) float64
    n: int                  # number of images the statistics are over
    features: np.ndarray    # (K, D) float32: a fixed random K of the N activations, for KID


def reference_cache_name(dataset_name, n, extractor_name=FID_EXTRACTOR_NAME):
    """e.g. fid_stats_cifar10-train_n50000_pt_inception-2015-12-05.npz"""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset_name}")
    return f"fid_stats_{safe}_n{n}_{extractor_name}.npz"


def images_fingerprint(images):
    """A short hash of the images' shape and pixels: a cache made for other images never matches."""
    pixels = np.ascontiguousarray(images.cpu().numpy() if torch.is_tensor(images) else images)
    digest = hashlib.blake2b(str(pixels.shape).encode(), digest_size=8)
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def load_statistics(path):
    """mu and sigma from an .npz with keys mu and sigma (ours, or pytorch-fid --save-stats)."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not an FID statistics .npz with arrays mu and sigma ({e})") from None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


def _read_reference_cache(path, n, fingerprint, num_features):
    """The cached ReferenceStats if path holds them for these images, else None."""
    try:
        with np.load(path) as f:
            if int(f["n"]) != n or str(f["fingerprint"]) != fingerprint or len(f["features"]) < num_features:
                return None
            return ReferenceStats(f["mu"], f["sigma"], n, f["features"][:num_features])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def reference_statistics(images, extractor, cache_path, batch_size=100, device="cpu", kid_features=10_000,
                         progress=True):
    """ReferenceStats of uint8 images (N, H, W, 3), read from cache_path when it holds them for
    these very images (same pixels, same N), else computed and saved there atomically.

    Keeps a fixed random min(kid_features, N) of the activations for KID (10,000 x 2048 float32
    is 80 MB on disk); sigma is 32 MB at D = 2048."""
    n, fingerprint = len(images), images_fingerprint(images)
    num_features = min(kid_features, n)
    cached = _read_reference_cache(cache_path, n, fingerprint, num_features)
    if cached is not None:
        return cached
    activations = compute_activations(images, extractor, batch_size, device, progress)
    mu, sigma = activation_statistics(activations)
    keep = np.sort(np.random.default_rng(0).choice(n, num_features, replace=False))
    stats = ReferenceStats(mu, sigma, n, activations[keep])
    Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma, n=np.int64(n),
                                                fingerprint=np.str_(fingerprint), features=stats.features))
    return stats


def fid_kid(images, reference, extractor, batch_size=100, device="cpu", kid_subsets=100, progress=True):
    """FID and KID (mean, std) of uint8 images (N, H, W, 3) against ReferenceStats. KID subsets hold
    min(1000, N, K) features, so KID over fewer than 1000 images is noisier, not invalid."""
    activations = compute_activations(images, extractor, batch_size, device, progress)
    fid = frechet_distance(*activation_statistics(activations), reference.mu, reference.sigma)
    kid, kid_std = kernel_inception_distance(activations, reference.features, subsets=kid_subsets)
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


FID_LOG_COLUMNS = ("time", "checkpoint", "step", "num_samples", "sampler", "steps", "spacing", "clip", "eta", "source",
                   "precision", "classes", "guidance_scale", "reference", "reference_n", "fid", "kid", "kid_std")


def reference_images(cfg, data_dir):
    """The whole training set of a run's dataset as uint8 (N, H, W, 3), and its name for the cache."""
    if cfg.dataset == "cifar10":
        return load_cifar10_train(data_dir).transpose(0, 2, 3, 1), "cifar10-train"
    images, _ = load_image_folder(data_dir, cfg.image_size, cfg.num_workers)
    return images.transpose(0, 2, 3, 1), f"folder-{Path(data_dir).resolve().name}"


def evaluate_fid(images, reference, reference_name, extractor, run_dir, info, device="cpu", batch_size=200):
    """FID and KID of uint8 images (N, H, W, 3) against a reference set whose Inception statistics
    are cached beside the run folder, in fid_stats/ (keyed by name and size); appends a row to the
    run's fid_log.csv. Returns the scores."""
    cache = Path(run_dir).parent / "fid_stats" / reference_cache_name(reference_name, len(reference))
    stats = reference_statistics(reference, extractor, cache, batch_size, device)
    scores = fid_kid(images, stats, extractor, batch_size, device)
    append_csv_row(Path(run_dir) / "fid_log.csv", FID_LOG_COLUMNS, dict(
        info, num_samples=len(images), reference=reference_name, reference_n=stats.n, fid=f"{scores['fid']:.4f}",
        time=time.strftime("%Y-%m-%dT%H:%M:%S"), kid=f"{scores['kid']:.6f}", kid_std=f"{scores['kid_std']:.6f}"))
    return dict(scores, reference_n=stats.n)


def append_csv_row(path, columns, row):
    """Append a row to a CSV log; a log written with other columns (an older version) is first
    rewritten with these, its rows kept, so every row stays under its own header."""
    path, rows = Path(path), []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader) if tuple(reader.fieldnames or ()) != tuple(columns) else None
    if rows is not None:
        atomic_write_text(csv_text(columns, rows), path)
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=columns, extrasaction="ignore").writerow(row)


class FidDuringTraining:
    """FID of the EMA model every --fid_every epochs: --fid_samples images from 20-step DPM-Solver++,
    against the whole training set (statistics cached beside the runs), logged to fid_log.csv. A
    class-conditional model is scored on samples of every class in turn, at --guidance_scale."""

    def __init__(self, cfg, paths, device, class_names=(), guide=None, guide_name=""):
        self.paths, self.device = paths, device
        classes = torch.arange(cfg.fid_samples) % len(class_names) if class_names else None
        spec = SamplingSpec("dpmpp2m", min(20, cfg.timesteps), clip_x0=cfg.clip_x0,
                            guidance_scale=cfg.guidance_scale if class_names or guide else 1.0, guide=guide_name)
        self.job = SamplingJob(cfg, spec, classes, cfg.seed, "all" if class_names else "", cfg.fid_samples,
                               cfg.batch_size, guide)
        self.extractor = build_fid_inception(cfg.fid_weights or None, device)
        self.reference, self.reference_name = reference_images(cfg, cfg.data_dir)

    def __call__(self, ema_model, diffusion, step):
        images = self.job.draw(ema_model, diffusion)
        info = self.job.fid_info(ema_model, checkpoint="(training)", step=step, source="ema")
        return evaluate_fid(images, self.reference, self.reference_name, self.extractor, self.paths.checkpoints,
                            info, self.device)["fid"]


# --- Extras: safetensors files and diffusers folders (the paper's published weights in, ours out) ----

def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(".safetensors files need the safetensors package: pip install safetensors") from None
    return safetensors


def export_safetensors(ckpt, path, use_ema=True):
    """The sampling weights (EMA unless use_ema=False) and the config as a .safetensors file: no
    pickle at all, so any tool can read it without trusting it."""
    safetensors = _safetensors()
    source = sampling_source(ckpt, use_ema)
    tensors = {name: t.contiguous() for name, t in ckpt[source].items()}
    metadata = dict(format="train_ddpm/2", config=json.dumps(ckpt["config"]), weights=source,
                    step=str(ckpt.get("step", 0)), epoch=str(ckpt.get("epoch", 0)))
    if ckpt.get("class_names"):
        metadata["class_names"] = json.dumps(list(ckpt["class_names"]))
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))


def read_safetensors(path):
    """A checkpoint-like dict (model, config, step, epoch) from an exported .safetensors file."""
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        config = json.loads(metadata["config"])
    except Exception as e:
        raise UserError(f"{path} is not a readable train_ddpm.py .safetensors file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return dict(model=tensors, config=config, step=int(metadata.get("step", 0)), epoch=int(metadata.get("epoch", 0)),
                weights_only=True, class_names=json.loads(metadata.get("class_names", "[]")))


# google/ddpm-cifar10-32, the port of the paper's TensorFlow checkpoint that diffusers users have, is
# a UNet2DModel of ResNet blocks (DownBlock2D/AttnDownBlock2D, UpBlock2D/AttnUpBlock2D), single-head
# attention and a sinusoidal time embedding: the function our UNet computes. Reading and writing such
# folders needs only json and safetensors; diffusers itself is not imported.

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_VERSION = "0.30.0"  # written into exported configs: the oldest diffusers the export is tested with
# UNet2DModel's defaults for the keys we read, for configs that leave them out.
UNET2D_DEFAULTS = dict(sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
                       time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
                       flip_sin_to_cos=True, mid_block_type="UNetMidBlock2D", block_out_channels=(224, 448, 672, 896),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv",
                       upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32,
                       attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
                       add_attention=True, class_embed_type=None, num_class_embeds=None)
# What our UNet computes, as UNet2DModel settings: anything else is refused, naming the key.
UNET2D_REQUIRED = dict(in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
                       freq_shift=1, flip_sin_to_cos=False, mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1,
                       downsample_type="conv", upsample_type="conv", act_fn="silu",
                       resnet_time_scale_shift="default", class_embed_type=None, num_class_embeds=None)
# diffusers before 0.15 named the attention weights query/key/value/proj_attn.
DEPRECATED_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _resblock_rows(ours, resnet, attention):
    rows = [(f"{ours}.{a}", (f"{resnet}.{b}",), False) for a, b in (
        ("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
        ("conv2", "conv2"), ("skip", "conv_shortcut"))]
    if attention:  # our 1x1-conv projections are diffusers' Linear layers; our qkv is their q, k, v stacked
        rows += [(f"{ours}.attn.norm", (f"{attention}.group_norm",), False),
                 (f"{ours}.attn.qkv", tuple(f"{attention}.{n}" for n in ("to_q", "to_k", "to_v")), True),
                 (f"{ours}.attn.proj", (f"{attention}.to_out.0",), True)]
    return rows


def diffusers_name_table(cfg):
    """The one mapping between our UNet's modules and UNet2DModel's, used in both directions: rows of
    (our module, its diffusers module(s), whether theirs are Linear). It lists every module the
    architecture may have (shortcuts, attention); a model uses the rows whose modules it has."""
    levels = len(cfg.channel_mults)
    rows = [("time_mlp.0", ("time_embedding.linear_1",), False), ("time_mlp.2", ("time_embedding.linear_2",), False),
            ("head", ("conv_in",), False), ("out.0", ("conv_norm_out",), False), ("out.2", ("conv_out",), False)]
    k = 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            block = f"down_blocks.{level}"
            rows += _resblock_rows(f"down.{k}", f"{block}.resnets.{j}", f"{block}.attentions.{j}")
            k += 1
        if level < levels - 1:
            rows.append((f"down.{k}.conv", (f"down_blocks.{level}.downsamplers.0.conv",), False))
            k += 1
    rows += _resblock_rows("mid.0", "mid_block.resnets.0", "mid_block.attentions.0")
    rows += _resblock_rows("mid.1", "mid_block.resnets.1", None)
    k = 0
    for j, level in enumerate(reversed(range(levels))):  # up_blocks[0] is the lowest resolution
        for i in range(cfg.num_res_blocks + 1):
            rows += _resblock_rows(f"up.{k}", f"up_blocks.{j}.resnets.{i}", f"up_blocks.{j}.attentions.{i}")
            k += 1
        if level > 0:
            rows.append((f"up.{k}.conv", (f"up_blocks.{j}.upsamplers.0.conv",), False))
            k += 1
    return rows


def state_to_diffusers(state, cfg):
    out = {}
    for ours, theirs, linear in diffusers_name_table(cfg):
        for param in ("weight", "bias"):
            if f"{ours}.{param}" in state:
                for name, part in zip(theirs, state[f"{ours}.{param}"].chunk(len(theirs))):
                    out[f"{name}.{param}"] = part.reshape(part.shape[0], -1) if linear and param == "weight" else part
    return {name: t.contiguous() for name, t in out.items()}


def state_from_diffusers(state, cfg, where):
    """UNet2DModel's state dict -> ours; a missing or left-over tensor is refused, naming it."""
    state = {_renamed(name): t for name, t in state.items()}
    with torch.device("meta"):  # our UNet's parameter shapes, without memory or initialisation
        shapes, out = {name: t.shape for name, t in build_model(cfg).state_dict().items()}, {}
    for ours, theirs, linear in diffusers_name_table(cfg):
        for param in ("weight", "bias"):
            if f"{ours}.{param}" not in shapes:
                continue
            names = [f"{name}.{param}" for name in theirs]
            missing = [n for n in names if n not in state]
            if missing:
                raise UserError(f"{where} lacks the weights {missing[0]} that its config.json implies")
            tensor = torch.cat([state.pop(n) for n in names])
            if tensor.numel() != shapes[f"{ours}.{param}"].numel():
                raise UserError(f"{where}: {names[0]} has shape {tuple(tensor.shape)}, which its config.json "
                                f"does not give")
            out[f"{ours}.{param}"] = tensor.reshape(shapes[f"{ours}.{param}"]).float()
    if state:
        raise UserError(f"{where} has weights this UNet cannot use, e.g. {sorted(state)[0]}")
    return out


def _renamed(name):
    for old, new in DEPRECATED_ATTENTION_NAMES.items():
        name = name.replace(old, new)
    return name


def config_from_diffusers(unet, scheduler, where):
    """Our Config from a UNet2DModel config.json and a scheduler_config.json (dicts); a setting our
    UNet or schedule cannot reproduce exactly is refused with one line naming the key."""
    unet = {**UNET2D_DEFAULTS, **unet}

    def refuse_if(bad, key, value, need):
        if bad:
            raise UserError(f"{where}: {key}={json.dumps(value)} cannot be reproduced here ({need})")

    for key, want in UNET2D_REQUIRED.items():
        refuse_if(unet[key] != want, key, unet[key], f"only {json.dumps(want)} is supported")
    widths, base = list(unet["block_out_channels"]), unet["block_out_channels"][0]
    refuse_if(any(w % base for w in widths),
              "block_out_channels", widths, "every width must be a multiple of the first")
    groups = unet["norm_num_groups"]
    refuse_if(any(w % groups for w in widths), "norm_num_groups", groups, "it must divide every width")
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    refuse_if(len(down) != len(widths) or any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down),
              "down_block_types", down, "DownBlock2D or AttnDownBlock2D, one per width")
    refuse_if([b.replace("Up", "Down") for b in reversed(up)] != down,
              "up_block_types", up, "the mirror image of down_block_types: UpBlock2D or AttnUpBlock2D")
    size = unet["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    refuse_if(not isinstance(size, int), "sample_size", size, "one square size")
    attn_levels = [level for level, b in enumerate(down) if b.startswith("Attn")]
    refuse_if(attn_levels and not unet["add_attention"],
              "add_attention", False, "attention in the blocks needs it in the middle block too")
    attention_widths = [widths[level] for level in attn_levels] + ([widths[-1]] if unet["add_attention"] else [])
    refuse_if(unet["attention_head_dim"] is not None and any(w != unet["attention_head_dim"] for w in attention_widths),
              "attention_head_dim", unet["attention_head_dim"], "single-head attention: null or the attention width")
    refuse_if(unet["attn_norm_num_groups"] not in (None, unet["norm_num_groups"]),
              "attn_norm_num_groups", unet["attn_norm_num_groups"], "the same groups as norm_num_groups")
    refuse_if(unet["downsample_padding"] not in (0, 1), "downsample_padding", unet["downsample_padding"],
              "0 (TensorFlow SAME) or 1")

    scheduler = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                 "trained_betas": None, "prediction_type": "epsilon", "variance_type": "fixed_small", **scheduler}
    schedules = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
    refuse_if(scheduler["beta_schedule"] not in schedules or scheduler["trained_betas"],
              "beta_schedule", scheduler["beta_schedule"], "linear or squaredcos_cap_v2, no trained_betas")
    refuse_if(scheduler["prediction_type"] != "epsilon",
              "prediction_type", scheduler["prediction_type"], "the model must predict the noise: epsilon")
    refuse_if(str(scheduler["variance_type"]).startswith("learned"),
              "variance_type", scheduler["variance_type"], "learned variances need a second output")
    refuse_if(scheduler.get("rescale_betas_zero_snr"), "rescale_betas_zero_snr", True, "only the plain schedules")
    return Config(image_size=size, base_channels=base, channel_mults=tuple(w // base for w in widths),
                  num_res_blocks=unet["layers_per_block"], use_attention=bool(unet["add_attention"]),
                  attn_resolutions=tuple(size // 2 ** level for level in attn_levels),
                  dropout=float(unet["dropout"]), emb_dim=unet["time_embedding_dim"] or 4 * base,
                  norm_groups=groups, norm_min_channels=min(Config.norm_min_channels, min(widths) // groups), norm_eps=float(unet["norm_eps"]),
                  downsample_padding="same" if unet["downsample_padding"] == 0 else "symmetric",
                  timesteps=scheduler["num_train_timesteps"], schedule_type=schedules[scheduler["beta_schedule"]],
                  beta_start=float(scheduler["beta_start"]), beta_end=float(scheduler["beta_end"]), cosine_s=0.008,
                  clip_x0=clip_from_diffusers(scheduler, refuse_if), run_name=Path(where).resolve().name)


def diffusers_unet_folder(path):
    """The UNet2DModel folder of a diffusers folder (a DDPMPipeline's unet/, or the folder itself), or None."""
    path = Path(path)
    for folder in (path / "unet", path):
        if (folder / "config.json").is_file() and any((folder / w).is_file() for w in DIFFUSERS_WEIGHTS):
            return folder
    return None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON file ({type(e).__name__}: {str(e)[:200]})") from None


def read_diffusers(path):
    """A checkpoint-like dict (model, config) from a DDPMPipeline or UNet2DModel folder. The schedule
    comes from the pipeline's scheduler/scheduler_config.json (or one beside the UNet's config.json);
    a lone UNet folder gets diffusers' default DDPMScheduler (the paper's linear 1e-4..0.02, T = 1000)."""
    unet_dir = diffusers_unet_folder(path)
    if unet_dir is None:
        raise UserError(f"{path} is neither a diffusers folder (config.json and {DIFFUSERS_WEIGHTS[0]}) "
                        f"nor a run folder")
    schedule_file = next((p for p in (Path(path) / "scheduler" / "scheduler_config.json",
                                      unet_dir / "scheduler_config.json",  # the flat layout of early hub folders
                                      unet_dir.parent / "scheduler" / "scheduler_config.json") if p.is_file()), None)
    cfg = config_from_diffusers(_read_json(unet_dir / "config.json"),
                                _read_json(schedule_file) if schedule_file else {}, str(path))
    weights = next(unet_dir / w for w in DIFFUSERS_WEIGHTS if (unet_dir / w).is_file())
    safe = weights.suffix == ".safetensors"
    load = _safetensors().torch.load_file if safe else (lambda p: torch.load(p, map_location="cpu", weights_only=True))
    try:
        state = load(str(weights))
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e)[:200]}" if safe else _load_failure_reason(e)
        raise UserError(f"{weights} is unreadable or corrupt ({reason})") from None
    return dict(model=state_from_diffusers(state, cfg, str(path)), config=asdict(cfg), step=0, epoch=0,
                weights_only=True)


def diffusers_configs(cfg):
    """(UNet2DModel config, DDPMScheduler config) of our Config; what UNet2DModel cannot express is
    refused with one line."""
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    with torch.device("meta"):
        norms = [m for m in build_model(cfg).modules() if isinstance(m, nn.GroupNorm)]
    odd = next((n for n in norms if n.num_groups != cfg.norm_groups), None)
    if odd is not None:
        raise UserError(f"cannot export to diffusers: UNet2DModel uses norm_num_groups={cfg.norm_groups} for every "
                        f"GroupNorm, but the width {odd.num_channels} has {odd.num_groups} groups "
                        f"(--norm_groups and --norm_min_channels decide them)")
    if cfg.schedule_type == "cosine" and cfg.cosine_s != 0.008:
        raise UserError(f"cannot export to diffusers: its squaredcos_cap_v2 schedule has s = 0.008, "
                        f"not --cosine_s {cfg.cosine_s:g}")
    attn = [cfg.use_attention and cfg.image_size // 2 ** level in cfg.attn_resolutions for level in range(len(widths))]
    unet = dict(_class_name="UNet2DModel", _diffusers_version=DIFFUSERS_VERSION, sample_size=cfg.image_size,
                **UNET2D_REQUIRED, time_embedding_dim=cfg.emb_dim, block_out_channels=widths,
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                layers_per_block=cfg.num_res_blocks, downsample_padding=0 if cfg.downsample_padding == "same" else 1,
                dropout=cfg.dropout, attention_head_dim=None, norm_num_groups=cfg.norm_groups,
                attn_norm_num_groups=None, norm_eps=cfg.norm_eps, add_attention=cfg.use_attention)
    scheduler = dict(_class_name="DDPMScheduler", _diffusers_version=DIFFUSERS_VERSION,
                     num_train_timesteps=cfg.timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                     beta_schedule="linear" if cfg.schedule_type == "linear" else "squaredcos_cap_v2",
                     trained_betas=None, variance_type="fixed_large", prediction_type="epsilon",
                     **DIFFUSERS_CLIP[cfg.clip_x0])
    return unet, scheduler


# How diffusers' schedulers say each --clip_x0. Their dynamic thresholding caps s at sample_max_value;
# Imagen's rule has no cap, so the export sets one that no prediction reaches (x_0 at t = T - 1 is
# about 157 times the eps error: hundreds, not millions).
DIFFUSERS_CLIP = {
    "static": dict(clip_sample=True, clip_sample_range=1.0, thresholding=False),
    "dynamic": dict(clip_sample=True, clip_sample_range=1.0, thresholding=True,
                    dynamic_thresholding_ratio=DYNAMIC_PERCENTILE, sample_max_value=1e6),
    "none": dict(clip_sample=False, thresholding=False),
}


def clip_from_diffusers(scheduler, refuse_if):
    """The --clip_x0 of a diffusers scheduler config (which clips by default); refuse_if(bad, key, value,
    need) for a rule ours cannot reproduce."""
    refuse_if(scheduler.get("clip_sample", True) and scheduler.get("clip_sample_range", 1.0) != 1.0,
              "clip_sample_range", scheduler.get("clip_sample_range"), "clipping to [-1, 1] only")
    if not scheduler.get("thresholding"):
        return "static" if scheduler.get("clip_sample", True) else "none"
    cap = scheduler.get("sample_max_value", 1.0)
    if cap <= 1:
        return "static"  # s held at 1: thresholding is clipping
    refuse_if(cap < DIFFUSERS_CLIP["dynamic"]["sample_max_value"], "sample_max_value", cap,
              f"1 (clipping) or at least {DIFFUSERS_CLIP['dynamic']['sample_max_value']:g} (dynamic thresholding "
              f"without a cap)")
    refuse_if(scheduler.get("dynamic_thresholding_ratio", 0.995) != DYNAMIC_PERCENTILE, "dynamic_thresholding_ratio",
              scheduler.get("dynamic_thresholding_ratio"), f"only {DYNAMIC_PERCENTILE}")
    return "dynamic"


def export_diffusers(ckpt, folder, use_ema=True):
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) of the sampling weights (EMA unless
    use_ema=False) and the schedule, written whole or not at all."""
    cfg = config_from_dict(ckpt["config"])
    unet, scheduler = diffusers_configs(cfg)
    safetensors = _safetensors()
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    index = dict(_class_name="DDPMPipeline", _diffusers_version=DIFFUSERS_VERSION,
                 scheduler=["diffusers", "DDPMScheduler"], unet=["diffusers", "UNet2DModel"])
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        for path, content in ((tmp / "model_index.json", index), (tmp / "unet" / "config.json", unet),
                              (tmp / "scheduler" / "scheduler_config.json", scheduler)):
            path.write_text(json.dumps(content, indent=2) + "\n")
        tensors = state_to_diffusers(ckpt[sampling_source(ckpt, use_ema)], cfg)
        (tmp / "unet" / DIFFUSERS_WEIGHTS[0]).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))
        os.replace(tmp, folder)  # the whole folder appears at once (an empty one in its place is replaced)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a half-written one after a failure


if __name__ == "__main__":
    sys.exit(main())
