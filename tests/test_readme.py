"""The README: its model and alias tables are current, and its Python snippets run as written, in order, on a CPU.

The snippets run in one namespace, top to bottom, each after the few lines of setup it takes for granted (an image
batch, a file to load). Two things differ from a user's machine, and only these: models are built with one block
(``depth=1`` unless a snippet says otherwise; timm's too), so that the largest ones run in seconds; and pretrained
weights are served from a local file of random weights instead of the network (the tests never download).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import vitfast
from vitfast.models._info import alias_table, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", README.read_text(), re.DOTALL)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def test_model_table_is_current() -> None:
    assert _block("model-table") == markdown_table(), "regenerate with `vitfast list --markdown`"


def test_alias_table_is_current() -> None:
    assert _block("alias-table") == alias_table(), "regenerate with `vitfast list --markdown`"


def test_readme_test_command_is_what_ci_runs() -> None:
    command = re.search(r"^(python -m pytest tests[^#\n]*?)\s*#", README.read_text(), re.MULTILINE)
    assert command, "the README's Tests section shows no `python -m pytest tests ...` command"
    ci = (README.parent / ".ci" / "run").read_text()
    assert command.group(1).strip() in ci.splitlines(), f"{command.group(1)!r} is not the command .ci/run runs"


def _snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def _pil_image(seed: int):
    from PIL import Image

    pixels = torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def _image_folders(namespace: dict) -> None:
    """photos/ with two JPEGs, and imagenet/val in the ImageFolder layout (two ImageNet synsets, one image each)."""
    for path, seed in (("photos/a.jpg", 3), ("photos/b.jpg", 4), ("imagenet/val/n01440764/x.jpg", 5),
                       ("imagenet/val/n01443537/y.jpg", 6)):  # fmt: skip
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _pil_image(seed).save(path)


# Depth of the models the snippets build (one block, for speed) unless a snippet's setup needs more
DEPTH = {"blocks": 1}


def _backbone_snippet(namespace: dict) -> None:
    """It names blocks 3, 7 and 11: the models keep their 12 blocks here (at 224 px, a few seconds on the CPU)."""
    DEPTH["blocks"] = 12
    namespace.update(images=torch.randn(1, 3, 224, 224))


# what each snippet (found by a line it holds) takes for granted; a new snippet that needs setup gets a row here
SETUP = {
    "model.forward_intermediates(images, indices=[3, 7, 11])": _backbone_snippet,
    "records = vitfast.predict(": _image_folders,
    'vitfast.load_checkpoint(model, "eva02_L_pt_m38m_p14.pt"': lambda ns: torch.save(
        vitfast.create_model("eva02_large_patch14_224_mim").state_dict(), "eva02_L_pt_m38m_p14.pt"
    ),
    "engine = vitfast.optimize(": lambda ns: ns.update(images=torch.randn(1, 3, 448, 448)),
    "ops.preprocess(images_uint8_bhwc": lambda ns: ns.update(
        images_uint8_bhwc=torch.randint(0, 256, (2, 448, 448, 3), dtype=torch.uint8),
        cfg=ns["model"].pretrained_cfg,
        pil_image_1=_pil_image(1),
        pil_image_2=_pil_image(2),
    ),
    "vitfast.patch(model": lambda ns: ns.update(timm=pytest.importorskip("timm")),
    "student.forward_mim(": lambda ns: ns.update(
        student=vitfast.create_model("eva02_base_patch14_224_mim"),
        images=torch.randn(2, 3, 224, 224),
        batch_size=2,
        teacher_features=torch.randn(2, 256, 1024),
    ),
}


@pytest.fixture()
def one_block_models_and_local_weights(monkeypatch, tmp_path) -> None:
    import timm.models._builder

    import vitfast.checkpoint  # noqa: F811
    from vitfast.models.vision_transformer import ViTConfig

    from_kwargs = ViTConfig.from_kwargs.__func__
    monkeypatch.setattr(
        ViTConfig,
        "from_kwargs",
        classmethod(lambda cls, base, overrides: from_kwargs(cls, base, {"depth": DEPTH["blocks"], **overrides})),
    )
    monkeypatch.setitem(DEPTH, "blocks", 1)

    def local_weights(model, weights, **kwargs):
        """The real load path (file -> conversion -> strict load) on random weights of the model's own shapes."""
        path = tmp_path / f"{weights.tag}.safetensors"
        from safetensors.torch import save_file

        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_file(state, path)
        return vitfast.checkpoint.load_checkpoint(model, path, **kwargs)

    monkeypatch.setattr(vitfast.checkpoint, "load_pretrained", local_weights)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda model, *args, **kwargs: None)
    create_timm_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create_timm_model(name, **{"depth": 1, **kwargs}))
    # push_to_hub against a stand-in client: the real one would need the network and a token
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *args, **kwargs: "https://hub/commit")
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_readme_snippets_run_as_written(one_block_models_and_local_weights) -> None:
    snippets = _snippets()
    assert len(snippets) >= 5, "the README's Python snippets were not found"
    namespace: dict = {}
    for number, code in enumerate(snippets, 1):
        for marker, setup in SETUP.items():
            if marker in code:
                setup(namespace)
        try:
            exec(compile(code, f"README.md python snippet {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README snippet {number} fails as written:\n{code}") from exc
    assert namespace["tokens"].shape == (1, 1 + 1024, 1024)  # what the quick start's comment says
    assert namespace["logits"].dtype == torch.float32 and namespace["loss"].ndim == 0
