"""Checkpoint reading and conversion, on files these tests write in each format, and pretrained-weight fetching."""

from __future__ import annotations

import argparse
import os
import pickle
import shutil

import numpy as np
import pytest
import timm.layers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vitfast
from tests.helpers import assert_close_scaled, randomize_
from vitfast import CheckpointError, PretrainedDownloadError, load_checkpoint
from vitfast.layers import resample_patch_embed


def _model(name: str, seed: int = 0, **kwargs):
    return randomize_(vitfast.create_model(name, **kwargs), seed=seed).eval()


def _same_outputs(a, b, size=224, what=""):
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_scaled(a.forward_features(image), b.forward_features(image), what=f"{what} features")
        assert_close_scaled(a(image), b(image), what=f"{what} logits")


def _fresh(name: str, **kwargs):
    return vitfast.create_model(name, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ plain formats


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin", ".pt"])
def test_round_trip_in_timm_format(tmp_path, suffix) -> None:
    source = _model("beitv2_base_patch16_224", depth=2, num_classes=4)
    path = tmp_path / f"beit{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"model": source.state_dict(), "epoch": 7}, path)
    target = _fresh("beitv2_base_patch16_224", depth=2, num_classes=4)
    report = load_checkpoint(target, path)
    assert report.ok and not report.dropped
    _same_outputs(target, source, what=suffix)


def test_in_memory_state_dict_and_model_ema_key() -> None:
    source = _model("vit_small_patch16_224", depth=1)
    target = _fresh("vit_small_patch16_224", depth=1)
    load_checkpoint(target, {"model_ema": source.state_dict(), "model": {}}, state_dict_key="model_ema")
    _same_outputs(target, source)
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        load_checkpoint(target, {"model": source.state_dict()}, state_dict_key="ema")


# ------------------------------------------------------------------------------------------------ official layouts


def _to_official_eva02(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm EVA-02 keys -> the official EVA-02 release's names (B/L: q_bias beside a bias-free q_proj)."""
    renames = [
        ("mlp.fc1_g.", "mlp.w1."),
        ("mlp.fc1_x.", "mlp.w2."),
        ("mlp.fc2.", "mlp.w3."),
        ("mlp.norm.", "mlp.ffn_ln."),
        ("mlp.fc1.", "mlp.w12."),
        ("attn.q_proj.bias", "attn.q_bias"),
        ("attn.v_proj.bias", "attn.v_bias"),
    ]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


@pytest.mark.parametrize(
    "name", [pytest.param("eva02_base_patch14_224", marks=pytest.mark.slow), "eva02_tiny_patch14_224"]
)
def test_official_eva02_names(tmp_path, name) -> None:
    source = _model(name, depth=2, num_classes=3)
    official = _to_official_eva02(source.state_dict())
    official["rope.freqs_cos"] = torch.randn(256, 64)
    official["rope.freqs_sin"] = torch.randn(256, 64)
    torch.save({"module": official}, tmp_path / "eva02.pt")
    target = _fresh(name, depth=2, num_classes=3)
    report = load_checkpoint(target, tmp_path / "eva02.pt")
    assert set(report.dropped) == {"rope.freqs_cos", "rope.freqs_sin"}
    _same_outputs(target, source, what=name)


def test_split_swiglu_weights_load_into_the_packed_layout() -> None:
    """PaddleMIX EVA-02 Ti/S checkpoints keep w1 (gate) and w2 (up) apart; timm packs them as fc1 = [w1; w2]."""
    source = _model("eva02_tiny_patch14_224", depth=2, num_classes=3)
    state = {}
    for key, value in source.state_dict().items():
        if ".mlp.fc1." in key:
            gate, up = value.chunk(2)
            state[key.replace("mlp.fc1.", "mlp.w1.")] = gate
            state[key.replace("mlp.fc1.", "mlp.w2.")] = up
        else:
            state[key] = value
    target = _fresh("eva02_tiny_patch14_224", depth=2, num_classes=3)
    report = load_checkpoint(target, state)
    assert any("packed fc1" in note for note in report.notes)
    _same_outputs(target, source)


def _mim_checkpoint(source) -> dict[str, torch.Tensor]:
    state = source.state_dict()
    return {**state, "lm_head.weight": torch.randn(1024, 192), "lm_head.bias": torch.randn(1024)}


def test_mim_checkpoint_into_classifier_and_back() -> None:
    mim = _model("eva02_tiny_patch14_224_mim", depth=2)
    assert {"mask_token", "norm.weight", "lm_head.weight"} <= set(mim.state_dict())
    classifier = _fresh("eva02_tiny_patch14_224", depth=2, num_classes=0)
    report = load_checkpoint(classifier, mim.state_dict())
    assert set(report.dropped) == {"mask_token", "lm_head.weight", "lm_head.bias"}
    assert any("`norm` loaded as `fc_norm`" in note for note in report.notes)
    torch.testing.assert_close(classifier.fc_norm.weight, mim.norm.weight)

    # timm's hub copies of the MIM encoders have fc_norm and no pretraining heads
    back = _fresh("eva02_tiny_patch14_224_mim", depth=2)
    report = load_checkpoint(back, classifier.state_dict())
    assert set(report.initialized) == {"mask_token", "lm_head.weight", "lm_head.bias"} and report.ok
    torch.testing.assert_close(back.norm.weight, mim.norm.weight)


def test_mae_pretraining_checkpoint_drops_the_decoder() -> None:
    source = _model("mae_vit_base_patch16", depth=1)
    state = dict(source.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 768)})
    state.update({"decoder_blocks.0.norm1.weight": torch.ones(512), "decoder_pred.bias": torch.zeros(768)})
    target = _fresh("mae_vit_base_patch16", depth=1)
    report = load_checkpoint(target, {"model": state})
    assert set(report.dropped) == {
        "mask_token",
        "decoder_embed.weight",
        "decoder_blocks.0.norm1.weight",
        "decoder_pred.bias",
    }
    _same_outputs(target, source)


def test_mocov3_release_layout(tmp_path) -> None:
    source = _model("mocov3_vit_small", depth=2)
    encoder = {f"module.base_encoder.{k}": v for k, v in source.state_dict().items()}
    encoder["module.base_encoder.head.0.weight"] = torch.randn(4096, 384)
    encoder["module.base_encoder.head.1.running_mean"] = torch.randn(4096)
    momentum = {f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in source.state_dict().items()}
    predictor = {"module.predictor.0.weight": torch.randn(4096, 256)}
    checkpoint = {"epoch": 300, "arch": "vit_small", "state_dict": {**encoder, **momentum, **predictor}}
    torch.save(checkpoint, tmp_path / "vit-s-300ep.pth.tar")
    target = _fresh("mocov3_vit_small", depth=2)
    report = load_checkpoint(target, tmp_path / "vit-s-300ep.pth.tar")
    assert "module.predictor.0.weight" in report.dropped and "module.momentum_encoder.cls_token" in report.dropped
    assert report.dropped["head.0.weight"].startswith("MoCo v3 projection head")
    _same_outputs(target, source)


def test_beit_shared_relative_position_bias_is_copied_to_every_block() -> None:
    source = _model("beitv2_base_patch16_224", depth=2, num_classes=0)
    shared = torch.randn(732, 12)
    state = {k: v for k, v in source.state_dict().items() if "relative_position_bias_table" not in k}
    state["rel_pos_bias.relative_position_bias_table"] = shared
    state["blocks.0.attn.relative_position_index"] = torch.zeros(197, 197, dtype=torch.long)
    state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
    state["mask_token"] = torch.zeros(1, 1, 768)
    state["cls_pt_layers.0.norm1.weight"] = torch.ones(768)
    target = _fresh("beitv2_base_patch16_224", depth=2, num_classes=0)
    report = load_checkpoint(target, {"module": state})
    for block in target.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table, shared)
    assert {"blocks.0.attn.relative_position_index", "mask_token", "cls_pt_layers.0.norm1.weight"} <= set(
        report.dropped
    )


def test_cae_encoder_prefix() -> None:
    source = _model("cae_base_patch16_224", depth=1, num_classes=2)
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state["teacher_network.cls_token"] = torch.zeros(1, 1, 768)
    state["regressor_and_decoder.blocks.0.norm1.weight"] = torch.ones(768)
    target = _fresh("cae_base_patch16_224", depth=1, num_classes=2)
    report = load_checkpoint(target, {"model": state})
    assert report.dropped["teacher_network.cls_token"] == "outside the encoder ('encoder.')"
    _same_outputs(target, source)


# ------------------------------------------------------------------------------------------------ Paddle / mindformers


def _to_paddle(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What paddle.save writes: numpy arrays, Linear weights stored [in, out]."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            value = value.T
        out[key] = value.detach().numpy().copy()
    out["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(out)}
    return out


@pytest.mark.parametrize("protocol", [2, 4])
def test_paddle_beit_foundation_checkpoint(tmp_path, protocol) -> None:
    """BEiT v2 as PaddleClas stores it: a fused qkv.bias (its key part must not matter) and a persisted index."""
    source = _model("BEiTv2_vit_base_patch16_224", depth=2)
    state = dict(source.state_dict())
    for i in range(2):
        q, v = state.pop(f"blocks.{i}.attn.q_bias"), state.pop(f"blocks.{i}.attn.v_bias")
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.randn(768), v])  # a non-zero key bias
        state[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(197, 197, dtype=torch.long)
    path = tmp_path / "BEiTv2_vit_base_patch16_224.pdparams"
    with open(path, "wb") as f:
        pickle.dump(_to_paddle(state), f, protocol=protocol)
    target = _fresh("BEiTv2_vit_base_patch16_224", depth=2)
    report = load_checkpoint(target, path)
    assert any("transposed" in n for n in report.notes) and any("key bias dropped" in n for n in report.notes)
    _same_outputs(target, source, what="paddle beit")


def test_paddle_clip_with_conv_bias_and_ln_pre(tmp_path) -> None:
    """2023 PaddleClas CLIP towers: ln_pre, and a patch conv bias the CLIP architecture lacks (folded, exactly)."""
    with_bias = _model("CLIP_vit_base_patch16_224", depth=2, patch_bias=True)
    state = {k.replace("norm_pre.", "ln_pre."): v for k, v in with_bias.state_dict().items()}
    path = tmp_path / "CLIP_vit_base_patch16_224.pdparams"
    with open(path, "wb") as f:
        pickle.dump(_to_paddle(state), f)
    target = _fresh("CLIP_vit_base_patch16_224", depth=2)
    assert target.patch_embed.proj.bias is None
    report = load_checkpoint(target, path)
    assert any("folded into pos_embed" in n for n in report.notes)
    _same_outputs(target, with_bias, what="folded conv bias")


def test_paddle_checkpoint_without_conv_bias_and_with_a_head(tmp_path) -> None:
    source = _model("vit_small_patch16_224", depth=1, num_classes=6)
    with torch.no_grad():
        source.patch_embed.proj.bias.zero_()
    state = {k.replace("head.", "head.fc_head."): v for k, v in source.state_dict().items()}
    del state["patch_embed.proj.bias"]
    path = tmp_path / "vit.pdparams"
    with open(path, "wb") as f:
        pickle.dump(_to_paddle(state), f)
    target = _fresh("vit_small_patch16_224", depth=1, num_classes=6)
    report = load_checkpoint(target, path)
    assert any("no patch-embedding bias" in n for n in report.notes)
    _same_outputs(target, source)


def test_pdparams_that_could_run_code_are_refused(tmp_path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(_fresh("vit_small_patch16_224", depth=1), path)


def test_mindformers_vit_base_p16_names(tmp_path) -> None:
    source = _model("vit_base_p16", depth=2)
    state = source.state_dict()
    ms = {"vit.cls_tokens": state["cls_token"], "vit.pos_embed": state["pos_embed"]}
    ms["vit.patch_embed.proj.weight"], ms["vit.patch_embed.proj.bias"] = (
        state["patch_embed.proj.weight"],
        state["patch_embed.proj.bias"],
    )
    for i in range(2):
        p = f"blocks.{i}."
        for ours, theirs in (("norm1", "layernorm1"), ("norm2", "layernorm2")):
            ms[f"vit.{p}{theirs}.gamma"], ms[f"vit.{p}{theirs}.beta"] = (
                state[p + ours + ".weight"],
                state[p + ours + ".bias"],
            )
        for j, (w, b) in enumerate(
            zip(state[p + "attn.qkv.weight"].chunk(3), state[p + "attn.qkv.bias"].chunk(3), strict=True), start=1
        ):
            ms[f"vit.{p}attention.dense{j}.weight"], ms[f"vit.{p}attention.dense{j}.bias"] = w, b
        for ours, theirs in (
            ("attn.proj", "attention.projection"),
            ("mlp.fc1", "output.mapping"),
            ("mlp.fc2", "output.projection"),
        ):
            ms[f"vit.{p}{theirs}.weight"] = state[p + ours + ".weight"].T  # stored [in, out]
            ms[f"vit.{p}{theirs}.bias"] = state[p + ours + ".bias"]
    ms["vit.fc_norm.gamma"], ms["vit.fc_norm.beta"] = state["fc_norm.weight"], state["fc_norm.bias"]
    ms["head.weight"], ms["head.bias"] = state["head.weight"], state["head.bias"]
    np.savez(tmp_path / "vit_base_p16.npz", **{k: v.numpy() for k, v in ms.items()})
    target = _fresh("vit_base_p16", depth=2)
    load_checkpoint(target, tmp_path / "vit_base_p16.npz")
    _same_outputs(target, source, what="mindformers")
    with pytest.raises(CheckpointError, match="MindSpore"):
        (tmp_path / "vit_base_p16.ckpt").write_bytes(b"\x00")
        load_checkpoint(target, tmp_path / "vit_base_p16.ckpt")


# ------------------------------------------------------------------------------------------------ shape adaptation


def test_position_embedding_is_resampled_like_timm() -> None:
    source = _model("vit_small_patch16_224", depth=1)
    target = _fresh("vit_small_patch16_224", depth=1, img_size=288)
    report = load_checkpoint(target, source.state_dict())
    expected = timm.layers.resample_abs_pos_embed(source.pos_embed.detach(), (18, 18), num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)
    assert any("pos_embed resampled" in n for n in report.notes)


def test_relative_position_tables_are_resized() -> None:
    source = _model("beitv2_base_patch16_224", depth=1)
    target = _fresh("beitv2_base_patch16_224", depth=1, img_size=160)
    load_checkpoint(target, source.state_dict())
    assert target.blocks[0].attn.relative_position_bias_table.shape == (19 * 19 + 3, 12)
    assert target(torch.randn(1, 3, 160, 160)).isfinite().all()


def test_patch_kernel_resampling_p14_to_16() -> None:
    source = _model("eva02_base_patch14_224_mim", depth=1)
    target = _fresh("eva02_base_patch16_224_mim", depth=1)
    report = load_checkpoint(target, source.state_dict())
    assert any("(bicubic)" in n for n in report.notes)
    expected = F.interpolate(
        source.patch_embed.proj.weight.detach(), size=(16, 16), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(target.patch_embed.proj.weight.detach(), expected)
    # 16x16 patches at 224 give a 14x14 grid: the 16x16 position table is resampled to it
    assert target.pos_embed.shape == (1, 197, 768)


def test_pinv_patch_resampling_preserves_patch_responses() -> None:
    """timm's choice: <resize(w), resize(x)> == <w, x> for every patch x when the kernel grows."""
    weight = torch.randn(8, 3, 14, 14, dtype=torch.float64).float()
    resized = resample_patch_embed(weight, (16, 16), method="pinv")
    patches = torch.randn(5, 3, 14, 14)
    grown = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    original = torch.einsum("ochw,bchw->bo", weight, patches)
    assert_close_scaled(torch.einsum("ochw,bchw->bo", resized, grown), original, tol=1e-4, what="pinv")
    with pytest.raises(ValueError, match="unknown patch-embedding resample method"):
        resample_patch_embed(weight, (16, 16), method="nearest")


# ------------------------------------------------------------------------------------------------ errors


def test_strict_loading_names_every_problem() -> None:
    source = _model("vit_small_patch16_224", depth=2)
    state = dict(source.state_dict())
    del state["blocks.1.norm2.weight"]
    state["blocks.0.attn.extra"] = torch.zeros(3)
    state["blocks.0.mlp.fc1.bias"] = torch.zeros(7)
    target = _fresh("vit_small_patch16_224", depth=2)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target, state)
    message = str(info.value)
    assert "blocks.1.norm2.weight" in message and "blocks.0.attn.extra" in message
    assert "blocks.0.mlp.fc1.bias (checkpoint [7], model [1536])" in message
    assert info.value.report.mismatched == [("blocks.0.mlp.fc1.bias", (7,), (1536,))]
    report = load_checkpoint(target, state, strict=False)
    assert report.missing == ["blocks.1.norm2.weight"] and report.unexpected == ["blocks.0.attn.extra"]


def test_classifier_of_another_width_needs_reset_head() -> None:
    source = _model("vit_small_patch16_224", depth=1, num_classes=1000)
    target = _fresh("vit_small_patch16_224", depth=1, num_classes=10)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_checkpoint(target, source.state_dict())
    report = load_checkpoint(target, source.state_dict(), reset_head=True)
    assert "head.weight" in report.dropped and target.head.out_features == 10


def test_unreadable_files(tmp_path) -> None:
    source = _model("vit_small_patch16_224", depth=1)
    target = _fresh("vit_small_patch16_224", depth=1)
    save_file(source.state_dict(), tmp_path / "ok.safetensors")
    torch.save(source.state_dict(), tmp_path / "ok.pth")
    for name in ("ok.safetensors", "ok.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated, corrupt"):
            load_checkpoint(target, tmp_path / f"cut_{name}")
    (tmp_path / "junk.pdparams").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="could not read"):
        load_checkpoint(target, tmp_path / "junk.pdparams")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(target, tmp_path / "missing.pth")
    torch.save({"note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_checkpoint(target, tmp_path / "empty.pth")


def test_python_objects_need_trust_pickle(tmp_path) -> None:
    source = _model("vit_small_patch16_224", depth=1)
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "with_args.pth")
    target = _fresh("vit_small_patch16_224", depth=1)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_checkpoint(target, tmp_path / "with_args.pth")
    load_checkpoint(target, tmp_path / "with_args.pth", trust_pickle=True)
    _same_outputs(target, source)


# ------------------------------------------------------------------------------------------------ pretrained=True


def test_pretrained_from_the_hub(tmp_path, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    source = _model("vit_small_patch16_224", depth=1)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    requests = []

    def fake_download(repo_id, filename, **kwargs):
        requests.append((repo_id, filename))
        if filename == "model.safetensors":
            raise EntryNotFoundError("no such file in the repo")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = vitfast.create_model("vit_small_patch16_224", pretrained=True, depth=1).eval()
    assert requests == [
        ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "model.safetensors"),
        ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "pytorch_model.bin"),
    ]
    _same_outputs(model, source)
    fine_tune = vitfast.create_model("vit_small_patch16_224", pretrained=True, depth=1, num_classes=10)
    assert fine_tune.head.out_features == 10
    torch.testing.assert_close(fine_tune.cls_token, source.cls_token)


def test_pretrained_offline_and_uncached_fails_with_directions(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        PretrainedDownloadError, match=r"timm/eva02_tiny_patch14_336\.mim_in22k_ft_in1k.*load_checkpoint"
    ):
        vitfast.create_model("eva02_tiny_patch14_336", pretrained=True)


def test_pretrained_from_a_url_is_cached(tmp_path, monkeypatch) -> None:
    source = _model("vit_base_patch16_224_mae_ft", depth=1)
    torch.save({"model": source.state_dict()}, tmp_path / "release.pth")
    downloads = []

    def fake_download(url, destination, progress=True):
        downloads.append(url)
        shutil.copy(tmp_path / "release.pth", destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for _ in range(2):
        model = vitfast.create_model("vit_base_patch16_224_mae_ft", pretrained=True, depth=1).eval()
    assert downloads == ["https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth"]
    _same_outputs(model, source)

    def no_network(url, destination, progress=True):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedDownloadError, match="MOCOV3_vit_small.pdparams.*load_checkpoint"):
        vitfast.create_model("MoCoV3_vit_small", pretrained=True)


def test_pretrained_without_registered_weights() -> None:
    with pytest.raises(ValueError, match="no pretrained weights are registered for cae_base_patch16_224"):
        vitfast.create_model("cae_base_patch16_224", pretrained=True)


def test_checkpoint_path_keeps_the_files_head_unless_asked(tmp_path) -> None:
    source = _model("vit_small_patch16_224", depth=1, num_classes=10)
    torch.save(source.state_dict(), tmp_path / "finetuned.pth")
    model = vitfast.create_model(
        "vit_small_patch16_224", depth=1, num_classes=10, checkpoint_path=tmp_path / "finetuned.pth"
    )
    _same_outputs(model.eval(), source)
    with pytest.raises(CheckpointError, match="head.weight"):
        vitfast.create_model(
            "vit_small_patch16_224", depth=1, num_classes=3, checkpoint_path=tmp_path / "finetuned.pth"
        )
    model = vitfast.create_model(
        "vit_small_patch16_224", depth=1, num_classes=3, checkpoint_path=tmp_path / "finetuned.pth", reset_head=True
    )
    assert model.head.out_features == 3
