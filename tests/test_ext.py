"""The optional compiled extension: loading rules, the build plan of setup.py, running without it, and transforms.

The op tests (tests/ops/test_preprocess.py, tests/ops/test_layer_norm_ext.py) take the extension from
:func:`extension_or_skip`: the installed build (CI installs it with setup.py), else a just-in-time build of csrc/
(CPU part; the CUDA kernels too when a GPU is visible), cached by torch between sessions.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitfast import _ext, transforms
from vitfast.ops import preprocess, preprocess_ref

ROOT = Path(__file__).resolve().parent.parent


def extension_or_skip():
    """The loaded extension (compiled just in time if needed); skips when this machine cannot build it."""
    if not _ext.HAS_EXT:
        if os.environ.get(_ext.DISABLE_ENV, "").strip() == "1":
            pytest.skip(f"the compiled extension is hidden ({_ext.DISABLE_ENV}=1)")
        from torch.utils import cpp_extension

        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler to build the extension just in time (set CXX)")
        if not cpp_extension.is_ninja_available():
            pytest.skip("ninja is not installed (pip install ninja): torch's just-in-time build needs it")
        _ext.load_jit(with_cuda=torch.cuda.is_available())
    return _ext.module


# ---- loading rules ----------------------------------------------------------------------------------------------

RUNNING = {"torch": "2.11.0+cu130", "cuda": "13.0", "cxx11_abi": True}


@pytest.mark.parametrize(
    "info, problem",
    [
        ({"torch": "2.11.1", "cuda": "13.0", "with_cuda": True, "cxx11_abi": True}, None),
        ({"torch": "2.11.0", "cuda": "12.8", "with_cuda": False, "cxx11_abi": True}, None),  # CPU-only build
        ({"torch": "2.10.0+cu130", "cuda": "13.0", "with_cuda": True}, "built for torch 2.10.0+cu130"),
        ({"torch": "3.11.0"}, "built for torch 3.11.0"),
        ({"torch": "2.11.0", "cuda": "12.8", "with_cuda": True}, "built for CUDA 12.8"),
        ({"torch": "2.11.0", "cxx11_abi": False}, "C++ ABI"),
        ({}, "built for torch None"),
    ],
)
def test_check_build_info(info, problem) -> None:
    result = _ext.check_build_info(info, RUNNING)
    assert result is None if problem is None else problem in result


def test_mismatched_build_is_not_imported(tmp_path) -> None:
    info_path = tmp_path / _ext.BUILD_INFO_FILE
    info_path.write_text(json.dumps({"torch": "1.13.1", "cuda": None, "with_cuda": False}))

    def must_not_import():
        raise AssertionError("a mismatched build must not be loaded")

    library, why, info = _ext.probe(info_path, must_not_import)
    assert library is None and info["torch"] == "1.13.1"
    assert "disabled" in why and "built for torch 1.13.1" in why and torch.__version__ in why
    library, why, info = _ext.probe(tmp_path / "missing.json", must_not_import)
    assert library is None and info is None and "no build info" in why


def test_import_time_check_warns_once_and_disables(monkeypatch, tmp_path) -> None:
    """The import-time path of vitfast._ext with an installed vitfast._C whose build info names another torch."""
    library = tmp_path / "_C.so"
    library.write_bytes(b"not a library: importing it would fail loudly")
    (tmp_path / _ext.BUILD_INFO_FILE).write_text(json.dumps({"torch": "2.0.1", "cuda": "11.8", "with_cuda": True}))
    spec = importlib.machinery.ModuleSpec("vitfast._C", None, origin=str(library))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == "vitfast._C" else real_find_spec(name, *a)
    )
    monkeypatch.delenv(_ext.DISABLE_ENV, raising=False)
    for name in ("HAS_EXT", "HAS_EXT_CUDA", "reason", "module", "build_info"):
        monkeypatch.setattr(_ext, name, getattr(_ext, name))  # restored after the test
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    with pytest.warns(RuntimeWarning, match=r"built for torch 2\.0\.1") as record:
        _ext._load_installed()
    assert len(record) == 1 and "--no-build-isolation" in str(record[0].message)
    assert not _ext.HAS_EXT and "disabled" in _ext.reason and _ext.build_info["torch"] == "2.0.1"


def test_load_jit_refuses_when_hidden(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setenv(_ext.DISABLE_ENV, "1")
    with pytest.raises(RuntimeError, match="hidden by VITFAST_DISABLE_EXT=1"):
        _ext.load_jit()


WITHOUT_EXTENSION = """
import warnings
warnings.simplefilter("error")
import torch
import vitfast
from vitfast import _ext, ops

assert not _ext.HAS_EXT and not _ext.HAS_EXT_CUDA and "VITFAST_DISABLE_EXT=1" in _ext.reason, _ext.reason
model = vitfast.create_model("eva02_tiny_patch14_224", depth=1, img_size=56, num_classes=3)
images = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)
mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
x = ops.preprocess(images, mean, std)
assert torch.equal(x, ops.preprocess_ref(images, mean, std))
assert model(x).shape == (2, 3)
try:
    vitfast.set_backend("cuda")
except RuntimeError as error:
    assert "needs vitfast's compiled extension" in str(error) and "VITFAST_DISABLE_EXT" in str(error), error
else:
    raise AssertionError("set_backend('cuda') without the extension must raise")
print("ok")
"""


@pytest.mark.slow
def test_package_runs_with_the_extension_hidden() -> None:
    env = {**os.environ, _ext.DISABLE_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- setup.py's build plan ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("vitfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() only runs as __main__
    return module


def test_setup_plan_skips_on_request(setup_module) -> None:
    assert setup_module.extension_plan({"VITFAST_BUILD_EXT": "0"}) == (False, False, "VITFAST_BUILD_EXT=0")


def test_setup_plan_without_torch_says_how_to_build(setup_module, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what pip's isolated build environment looks like
    build, with_cuda, why = setup_module.extension_plan({})
    assert not build and not with_cuda
    assert "torch is not importable" in why and "--no-build-isolation" in why


def test_setup_plan_without_compiler(setup_module) -> None:
    build, _with_cuda, why = setup_module.extension_plan({"CXX": "/nonexistent/c++"})
    assert not build and "no C++ compiler" in why


def test_setup_plan_cuda_choice(setup_module, monkeypatch) -> None:
    build, with_cuda, why = setup_module.extension_plan({"VITFAST_BUILD_CUDA": "0"})
    assert build and not with_cuda and "VITFAST_BUILD_CUDA=0" in why
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    build, with_cuda, why = setup_module.extension_plan({})
    expected = "CPU-only build" if torch.version.cuda is None else "nvcc not found"
    assert build and not with_cuda and expected in why


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: no CUDA plan to make")
def test_setup_plan_needs_a_toolkit_root(setup_module, monkeypatch, tmp_path) -> None:
    """An nvcc outside a toolkit root (no libcudart beside it) compiles but cannot link: CPU ops only."""
    from torch.utils import cpp_extension

    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {torch.version.cuda}, V0'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    build, with_cuda, why = setup_module.extension_plan({})
    assert build and not with_cuda and "has no lib64/libcudart.so" in why
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so.13").write_bytes(b"")
    assert setup_module.extension_plan({}) == (True, True, "")


# ---- transforms ---------------------------------------------------------------------------------------------------

Image = pytest.importorskip("PIL.Image", reason="the transform tests need Pillow")


def _pil_images() -> list:
    generator = np.random.default_rng(0)
    smooth = (
        torch.nn.functional.interpolate(torch.rand(1, 3, 12, 9) * 255, size=(301, 233), mode="bilinear")[0]
        .permute(1, 2, 0)
        .numpy()
    )
    noisy = np.clip(smooth + generator.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    return [
        Image.fromarray(noisy),  # portrait
        Image.fromarray(generator.integers(0, 256, (190, 517, 3), dtype=np.uint8)),  # landscape, pure noise
        Image.fromarray(generator.integers(0, 256, (260, 260), dtype=np.uint8)),  # grayscale, converted to RGB
    ]


TIMM_CASES = [
    "vit_small_patch16_224",  # crop_pct 0.9, bicubic
    "eva02_tiny_patch14_336",  # crop_pct 1.0, CLIP mean / std
    "eva02_base_patch14_448.mim_in22k_ft_in22k",  # squash
]


def _timm_transform(name: str):
    timm_data = pytest.importorskip("timm.data")
    import timm.models

    from vitfast.models._registry import resolve

    entry, weights, _kwargs = resolve(name)
    cfg = timm.models.get_pretrained_cfg(f"{entry.timm_name}.{weights.tag}")
    config = timm_data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    return config, timm_data.create_transform(**config)


@pytest.mark.parametrize("name", TIMM_CASES)
def test_for_model_matches_timm(name) -> None:
    config, timm_transform = _timm_transform(name)
    ours = transforms.data_config(name)
    for key in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"):
        assert ours[key] == (tuple(config[key]) if isinstance(config[key], (tuple, list)) else config[key]), key
    transform = transforms.for_model(name)
    images = _pil_images()
    expected = torch.stack([timm_transform(image.convert("RGB")) for image in images])  # timm loaders convert
    # PIL images: PIL resizes for both (torchvision calls it), normalization is the same fp32 formula: bit-exact
    assert torch.equal(transform(images), expected)
    # uint8 tensors: torchvision's antialiased tensor resize vs PIL's compute the same filter with other rounding
    # (float vs fixed point): measured on these images, 0.5-0.9% of the values differ, by one uint8 level, and one in
    # ~1e5 by two (bicubic overshoot near clipping when upscaling). Compared in uint8 levels of the input.
    arrays = [torch.from_numpy(np.array(image.convert("RGB"))) for image in images]
    std = torch.tensor(config["std"]).view(3, 1, 1)
    levels = ((transform(arrays) - expected) * std * 255).round().abs()
    assert levels.max() <= 2 and (levels > 0).float().mean() <= 0.02 and (levels > 1).float().mean() <= 1e-4


def test_normalize_step_is_timm_exactly() -> None:
    """On the same uint8 pixels, preprocess equals timm's ToTensor + Normalize bit for bit (the extension or not)."""
    from torchvision import transforms as tv

    pixels = torch.randint(0, 256, (3, 97, 131, 3), dtype=torch.uint8)
    pixels[0].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every byte value, in every channel
    pixels[0].view(-1)[256:512] = torch.arange(256, dtype=torch.uint8).roll(1)
    for mean, std in (
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ):
        timm_normalize = tv.Compose([tv.ToTensor(), tv.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))])
        expected = torch.stack([timm_normalize(Image.fromarray(p.numpy())) for p in pixels])
        assert torch.equal(preprocess(pixels, mean, std), expected)
        assert torch.equal(preprocess_ref(pixels, mean, std), expected)


def test_for_model_outputs(monkeypatch) -> None:
    images = _pil_images()
    transform = transforms.for_model("eva02_tiny_patch14_224", dtype=torch.bfloat16, patches=True)
    assert transform.patch_size == 14 and transform.crop_pct == 0.9 and transform.scale_size == (248, 248)
    rows = transform(images[0])
    image = transforms.for_model("eva02_tiny_patch14_224")(images[0])
    assert rows.shape == (1, 256, 3 * 14 * 14) and rows.dtype == torch.bfloat16
    assert torch.equal(
        rows, preprocess_ref(transform.resize_crop(images[0])[None], transform.mean, transform.std, 14, torch.bfloat16)
    )
    assert torch.equal(rows[0, 17].float(), image[0, :, 14:28, 14 * 1 : 14 * 2].bfloat16().float().flatten())

    model = __import__("vitfast").create_model("vit_small_patch16_224", depth=1, num_classes=2)
    cfg = transforms.data_config(model)
    assert (
        cfg["patch_size"] == 16
        and cfg["input_size"] == (3, 224, 224)
        and cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    )
    assert model(transforms.for_model(model)(images)).shape == (3, 2)


def test_transform_errors(monkeypatch) -> None:
    transform = transforms.for_model("vit_small_patch16_224")
    with pytest.raises(ValueError, match=r"uint8 image \[H, W, 3\]"):
        transform(torch.rand(50, 50, 3))
    with pytest.raises(TypeError, match="PIL image or a uint8 array"):
        transform("image.jpg")
    with pytest.raises(ValueError, match="crop_mode 'border' is not supported"):
        transforms.EvalTransform((224, 224), 1.0, "border", "bicubic", (0.5,) * 3, (0.5,) * 3)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        transform(_pil_images()[0])
