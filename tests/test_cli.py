"""The ``vitfast`` command."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitfast.cli import main


def test_list(capsys) -> None:
    assert main(["list", "eva02_base*"]) == 0
    assert capsys.readouterr().out.split() == [
        "eva02_base_patch14_224",
        "eva02_base_patch14_224_mim",
        "eva02_base_patch14_336",
        "eva02_base_patch14_448",
        "eva02_base_patch16_224_mim",
    ]
    assert main(["list", "--family", "mocov3", "--aliases"]) == 0
    assert "MoCoV3_vit_small" in capsys.readouterr().out
    assert main(["list", "beitv2_base*", "--pretrained"]) == 0
    assert "beitv2_base_patch16_224.in1k_ft_in22k" in capsys.readouterr().out.split()
    assert main(["list", "resnet*"]) == 1
    assert "no model matches" in capsys.readouterr().err


def test_info_counts_like_timm(capsys) -> None:
    assert main(["info", "vit_base_patch16_224", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        reference = timm.create_model("vit_base_patch16_224")
        with FlopCounterMode(display=False) as counter:
            reference(torch.empty(1, 3, 224, 224))
    assert record["params"] == sum(p.numel() for p in reference.parameters()) == 86_567_656
    assert record["gflops"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6)
    assert record["input_size"] == [3, 224, 224]
    assert record["pretrained"] == "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


def test_info_text_for_an_alias(capsys) -> None:
    assert main(["info", "EVA_vit_giant_patch14"]) == 0
    out = capsys.readouterr().out
    assert "alias of eva_giant_patch14_224" in out and "1011.15M" in out
    assert "foundation_models/EVA_vit_giant_patch14.pdparams" in out and "88" in out


def test_unknown_model_exits_2_with_suggestions(capsys) -> None:
    assert main(["info", "eva02_larg_patch14_448"]) == 2
    assert "Did you mean: eva02_large_patch14_448" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("vitfast") is None, reason="the console script is not installed in this environment")
def test_console_script() -> None:
    result = subprocess.run(["vitfast", "list", "cae*"], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["cae_base_patch16_224"]
