"""The menu knows the machine: its Enter choice without a GPU, and each preset's training time
estimated from its FLOPs and a rate measured here."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import train_ddpm as td


def test_the_flops_counted_on_meta_tensors_are_those_of_a_real_forward_times_three():
    cfg = dataclasses.replace(td.preset_config("quick_test", {}), use_attention=False, base_channels=16)
    model = td.build_model(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert td.training_flops_per_image(cfg) == 3 * counter.get_total_flops() > 0


def test_attention_counts_its_two_matmuls_and_four_projections_per_block():
    """Self-attention over N = HW positions of C channels: q k^T and (softmax) v, 2 N^2 C FLOPs each,
    and the 1x1 q, k, v and output projections, 2 N C^2 each."""
    cfg = td.preset_config("cpu_hour", {})
    model, shapes = td.build_model(cfg), []
    for module in model.modules():
        if isinstance(module, td.AttnBlock):
            module.register_forward_hook(lambda m, inputs, output: shapes.append(inputs[0].shape))
    model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert len(shapes) == 4  # 16x16: one down, two up; the 8x8 middle
    closed_form = sum(2 * 2 * (h * w) ** 2 * c + 4 * 2 * h * w * c * c for _, c, h, w in shapes)
    without = td.training_flops_per_image(dataclasses.replace(cfg, use_attention=False))
    assert td.training_flops_per_image(cfg) - without == 3 * closed_form


def test_a_presets_time_is_its_images_times_its_flops_over_the_rate_capped_by_max_minutes():
    cfg = td.preset_config("cifar10_optimized", {})
    images = cfg.epochs * (50_000 // cfg.batch_size) * cfg.batch_size
    assert td.estimated_seconds(cfg, 1e11) == pytest.approx(td.training_flops_per_image(cfg) * images / 1e11)
    hour = td.preset_config("cpu_hour", {})
    assert td.estimated_seconds(hour, 1e3) == 3600  # far too slow a machine: the preset's own time limit
    quick = td.preset_config("quick_test", {})  # its train_subset of 5,000 images, 5 epochs of 64
    assert td.estimated_seconds(quick, 1e9) == pytest.approx(td.training_flops_per_image(quick) * 5 * 78 * 64 / 1e9)


@pytest.mark.parametrize("seconds, text", [(20, "about 1 minute"), (89, "about 1 minute"), (3000, "about 50 minutes"),
                                           (5400, "about 2 hours"), (9 * 86_400 + 100, "about 9 days")])
def test_durations_read_as_people_say_them(seconds, text):
    assert td.duration_text(seconds) == text


def test_without_a_gpu_the_menu_offers_cpu_hour_and_with_one_the_recommended_start():
    assert td.menu_default_preset(has_cuda=False) == "cpu_hour"
    assert td.menu_default_preset(has_cuda=True) == td.DEFAULT_PRESET == "cifar10_optimized"


def test_the_measured_rate_is_positive_and_names_what_it_timed():
    rate, timed = td.measure_training_rate(torch.device("cpu"))
    assert rate > 1e6 and timed == "cpu_hour"
