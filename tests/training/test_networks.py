"""Registered architectures: parameter counts against the paper, config round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.networks import create_model, get_config, list_models, model_from_config

# Paper (Romero & Cordonnier 2021), R4 variants: RotMNIST about 44.4k, CIFAR-10 about 3.0M,
# PatchCamelyon about 207k parameters.
PAPER_PARAMS = {"gsa_rotmnist_r4": 44.4e3, "gsa_cifar10_r4": 3.0e6, "gsa_pcam_r4": 207e3}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_within_two_percent_of_the_paper(name):
    count = _count(create_model(name))
    assert abs(count - PAPER_PARAMS[name]) <= 0.02 * PAPER_PARAMS[name], f"{name}: {count} parameters"


def test_final_norm_adds_one_layernorm_and_old_configs_still_build():
    cfg = get_config("gsa_rotmnist_r4")
    assert cfg.final_norm
    with_norm = _count(create_model("gsa_rotmnist_r4"))
    without = _count(create_model("gsa_rotmnist_r4", final_norm=False))
    assert with_norm - without == 2 * cfg.dim
    # A checkpoint written before the field existed has no "final_norm" key: it rebuilds without it.
    old = dataclasses.asdict(cfg)
    del old["final_norm"]
    assert not model_from_config("gsa_rotmnist_r4", old).config.final_norm


def test_every_family_registers_every_group():
    for family in ("rotmnist", "cifar10", "pcam", "pcam48"):
        assert len(list_models(f"gsa_{family}_")) == 7


def test_input_pool():
    """gsa_pcam48: the 96x96 input is average-pooled 2x2 before lifting, which is the same net on
    the pooled image; a pool that does not divide the side is refused."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    half = create_model("gsa_pcam48_r4m").eval()
    assert half.config.img_size == 96 and half.config.input_pool == 2 and half.out_size == 3
    plain = model_from_config("gsa_plain", dataclasses.replace(half.config, img_size=48, input_pool=1)).eval()
    plain.load_state_dict(half.state_dict())
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(half(x), plain(F.avg_pool2d(x, 2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisor"):
        get_config("gsa_pcam48_r4m", input_pool=5)
