"""Checkpoints: read every format the families ship in, convert to timm / vitfast keys, load with a full report.

Formats read: ``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` / ``.tar`` (``torch.load`` with ``weights_only=True``
unless you pass ``trust_pickle=True``); Paddle ``.pdparams`` (a pickled dict of numpy arrays, read with an
unpickler that only accepts numpy arrays); ``.npz``.

Key layouts converted: timm; official EVA / EVA-02 (``mlp.w12``, ``mlp.ffn_ln``, ``attn.inner_attn_ln``,
``q_bias`` with split projections, MIM ``norm`` / ``mask_token`` / ``lm_head``); MAE (decoder dropped); MoCo v3
(``module.base_encoder.`` prefix, projector and momentum encoder dropped); BEiT / BEiT v2 (shared relative
position bias copied to every block, MIM heads dropped); CAE (``encoder.`` prefix); Paddle (Linear weights stored
``[in, out]``, ``ln_pre``, ``head.fc_head``, fused ``qkv.bias``); mindformers ``vit_base_p16`` key names.

Every key that is not loaded is reported by name: converted-away keys in ``LoadReport.dropped`` with the reason,
and with ``strict=True`` (the default) any missing, unexpected or mis-shaped key raises :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitfast.layers.patch_embed import adapt_input_channels
from vitfast.layers.pos_embed import resample_abs_pos_embed, resample_patch_embed
from vitfast.layers.rel_pos import NUM_EXTRA, resize_rel_pos_bias_table

__all__ = [
    "PRETRAINING_ONLY_KEYS",
    "CheckpointError",
    "LoadReport",
    "PretrainedDownloadError",
    "convert_state_dict",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
]

logger = logging.getLogger("vitfast")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys / shapes do not fit the model.

    From a strict load, ``report`` is the full :class:`LoadReport` (the message shows a summary of it).
    """

    report: LoadReport | None = None


class PretrainedDownloadError(RuntimeError):
    """Pretrained weights could not be fetched (no network, not cached, or the source is gone)."""


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: keys not loaded (and why), and the conversions it applied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    initialized: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing from the checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"not in the model ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, got, want in self.mismatched:
            lines.append(f"shape mismatch for {key}: checkpoint {list(got)}, model {list(want)}")
        for key, why in self.initialized.items():
            lines.append(f"not in the checkpoint, left at initialization: {key} ({why})")
        if self.dropped:
            reasons: dict[str, list[str]] = {}
            for key, why in self.dropped.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
                lines.append(f"dropped ({why}): {shown}")
        lines += [f"converted: {note}" for note in self.notes]
        return "\n".join(lines) or "all keys loaded"

    def summary(self, shown: int = 4) -> str:
        """The keys that do not fit, counted, with the first ``shown`` of each kind (a strict load's error)."""

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:shown]) + (f", ... (+{len(keys) - shown} more)" if len(keys) > shown else "")

        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} missing from the checkpoint: {first(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} not in the model: {first(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{key} (checkpoint {list(got)}, model {list(want)})" for key, got, want in self.mismatched]
            lines.append(f"{len(self.mismatched)} of another shape: {first(shapes)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading files

_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays (what ``paddle.save`` writes) and refuses anything that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a .pdparams file should hold numpy arrays")


def _read_pdparams(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(f).load()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict of arrays (got {type(obj).__name__}).")
    obj = {k: v for k, v in obj.items() if k != "StructuredToParameterName@@"}
    return {"__format__": "paddle", **obj}


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(stream: io.BufferedIOBase, max_pickles: int) -> set[str]:
    """The globals (``module.name``) that up to ``max_pickles`` consecutive pickles in ``stream`` import.

    Raises when a pickle is malformed. STACK_GLOBAL takes its names from the two strings pushed before it; a name
    fetched back from the memo is not resolved (it then shows as ``?``), which is enough to tell objects from damage.
    """
    found: set[str] = set()
    for _ in range(max_pickles):
        if not stream.peek(1):
            break
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                found.add(".".join(strings[-2:]) if len(strings) >= 2 else "?")
            elif opcode.name in _STRING_OPS:
                strings.append(str(arg))
    return found


def _torch_file_globals(path: Path) -> set[str] | None:
    """Every global a torch checkpoint's pickles import, or None when a pickle in it is malformed (damage)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                return _pickle_globals(io.BufferedReader(io.BytesIO(archive.read(name))), 1)
        # the legacy format: magic number, protocol, system info, the object, then raw storage bytes
        with open(path, "rb") as f:
            return _pickle_globals(io.BufferedReader(f), 4)
    except Exception:  # a truncated or overwritten stream fails in many ways
        return None


def _disallowed_globals(path: Path) -> list[str] | None:
    """The globals of ``path`` that ``torch.load(weights_only=True)`` does not allow; None if the file is damaged."""
    found = _torch_file_globals(path)
    if found is None:
        return None
    # torch's own allow-list (private, so guarded): without it, torch's and collections' names count as allowed
    unpickler = getattr(torch.serialization, "_weights_only_unpickler", None)
    try:
        allowed = set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except AttributeError:
        allowed = {name for name in found if name.startswith(("torch.", "collections.OrderedDict"))}
    return sorted(found - allowed)


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _disallowed_globals(path)
        if found is None:
            # a truncated or overwritten pickle also fails the weights-only unpickler: that is damage, and
            # trust_pickle would not help (it would only unpickle garbage with the safety off)
            raise CheckpointError(
                f"could not read checkpoint {path}: its pickle data is malformed. The file is truncated or corrupt: "
                "download or copy it again."
            ) from exc
        if not found:  # well formed, only torch-allowed globals, yet refused (e.g. a pickle protocol it lacks)
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(exc))
            raise CheckpointError(
                f"torch.load(weights_only=True) refuses {path} ({detail[1] if detail else exc}) although it names no "
                "disallowed Python object; if the file was not written by torch.save and you trust its source, pass "
                "trust_pickle=True."
            ) from exc
        if not trust_pickle:
            shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
            raise CheckpointError(
                f"{path} holds Python objects besides tensors ({shown}), which torch.load(weights_only=True) refuses "
                "because unpickling them can run code. If you trust the file's source, pass trust_pickle=True "
                "(or allow just these with torch.serialization.add_safe_globals)."
            ) from exc
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Read a checkpoint file into Python objects (tensors or numpy arrays), choosing the reader by extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist.")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".pth.tar") else path.suffix
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if suffix == ".pdparams":
            return _read_pdparams(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix == ".ckpt":
            raise CheckpointError(
                f"{path} looks like a MindSpore checkpoint, which needs MindSpore to read. Convert it with "
                "mindspore.load_checkpoint to a dict of numpy arrays, save that with numpy.savez (.npz), then load it."
            )
        return _read_torch(path, trust_pickle)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or corrupt files surface as many exception types
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(exc).__name__}: {exc}). The file may be truncated, corrupt, "
            f"or not in the format its extension {suffix or '(none)'} says."
        ) from exc


def _extract_state_dict(obj: Any, state_dict_key: str | None) -> tuple[dict[str, Any], str | None]:
    """Find the weights in a wrapped checkpoint. Returns (state_dict, source_format)."""
    source_format = obj.pop("__format__", None) if isinstance(obj, dict) else None
    if not isinstance(obj, dict):
        raise CheckpointError(f"a checkpoint must hold a dict of tensors, got {type(obj).__name__}.")
    if state_dict_key is not None:
        if state_dict_key not in obj:
            raise CheckpointError(f"checkpoint has no entry {state_dict_key!r}; its entries are {sorted(obj)[:20]}.")
        obj = obj[state_dict_key]
    else:
        for key in ("state_dict", "model", "module", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor | np.ndarray)}
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors at the top level or under state_dict/model/module.")
    return tensors, source_format


# ---------------------------------------------------------------------------------------------- conversion

_ENCODER_PREFIXES = ("module.base_encoder.", "base_encoder.", "module.", "encoder.", "visual.trunk.", "visual.")

# (pattern, replacement) on whole key segments: official EVA / EVA-02 and Paddle names -> timm names
_RENAMES = [
    (r"\.mlp\.ffn_ln\.", ".mlp.norm."),
    (r"\.attn\.inner_attn_ln\.", ".attn.norm."),
    (r"\.mlp\.w12\.", ".mlp.fc1."),
    (r"\.mlp\.w1\.", ".mlp.fc1_g."),
    (r"\.mlp\.w2\.", ".mlp.fc1_x."),
    (r"\.mlp\.w3\.", ".mlp.fc2."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^head\.fc_head\.", "head."),
    (r"^head\.fc_norm\.", "fc_norm."),
]

_DERIVED_BUFFERS = re.compile(
    r"(relative_position_index|\.k_bias$|^rope\.|\.rope\.|freqs_(cos|sin)|num_batches_tracked)"
)
_PRETRAIN_ONLY = [
    (re.compile(r"^decoder"), "MAE decoder (pretraining only)"),
    (re.compile(r"^head\.\d+\."), "MoCo v3 projection head (pretraining only)"),
    (re.compile(r"^(lm_head|cls_pt_layers|teacher|regressor)"), "MIM pretraining head"),
    (re.compile(r"^mask_token$"), "pretraining mask token (the model has none)"),
    (re.compile(r"^proj$"), "Paddle embedding projection (not part of the image tower)"),
]


def _to_tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def _convert_mindformers(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """mindformers ``vit_base_p16`` names: dense1/2/3 are q/k/v ``[out, in]``; projection, mapping ``[in, out]``."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        k = key.removeprefix("vit.")
        k = k.replace("cls_tokens", "cls_token").replace(".gamma", ".weight").replace(".beta", ".bias")
        k = k.replace(".layernorm1.", ".norm1.").replace(".layernorm2.", ".norm2.")
        match = re.match(r"blocks\.(\d+)\.attention\.dense([123])\.(weight|bias)$", k)
        if match:
            qkv.setdefault(f"blocks.{match[1]}.attn.qkv.{match[3]}", {})[match[2]] = value
            continue
        transpose = False
        for old, new in (
            (".attention.projection.", ".attn.proj."),
            (".output.mapping.", ".mlp.fc1."),
            (".output.projection.", ".mlp.fc2."),
        ):
            if old in k:
                k, transpose = k.replace(old, new), k.endswith(".weight")
        out[k] = value.T.contiguous() if transpose else value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["1"], parts["2"], parts["3"]], dim=0)
    report.notes.append("mindformers key names (dense1/2/3 -> qkv, [in, out] Linear weights transposed)")
    return out


def _convert_paddle(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2:
            value = value.T.contiguous()
        out[key] = value
    report.notes.append("Paddle layout: 2-D Linear weights transposed from [in, out] to [out, in]")
    return out


def _strip_prefix(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    for prefix in _ENCODER_PREFIXES:
        if prefix + "patch_embed.proj.weight" in sd:
            kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            for key in sd:
                if not key.startswith(prefix):
                    report.dropped[key] = f"outside the encoder ({prefix!r})"
            report.notes.append(f"stripped prefix {prefix!r}")
            return kept
    return sd


def _rename(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, new in _RENAMES:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def _adapt_to_model(sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Structural conversions that depend on which parameters the model has."""
    target = model.state_dict()
    block_ids = sorted({int(m[1]) for k in target for m in [re.match(r"blocks\.(\d+)\.", k)] if m})

    for i in block_ids:
        p = f"blocks.{i}."
        # fused qkv.bias -> q_bias / v_bias (the key bias is dropped: softmax ignores it)
        if p + "attn.q_bias" in target and p + "attn.qkv.bias" in sd:
            bias = sd.pop(p + "attn.qkv.bias")
            q, _, v = bias.chunk(3)
            sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = q, v
            if i == 0:
                report.notes.append("qkv.bias split into q_bias / v_bias (key bias dropped, exact)")
        # official EVA-02 B/L: q_bias / v_bias beside bias-free q_proj / v_proj
        for name in ("q", "v"):
            if p + f"attn.{name}_proj.bias" in target and p + f"attn.{name}_bias" in sd:
                sd[p + f"attn.{name}_proj.bias"] = sd.pop(p + f"attn.{name}_bias")
        # separate q/k/v projections -> fused qkv
        if p + "attn.qkv.weight" in target and p + "attn.q_proj.weight" in sd:
            sd[p + "attn.qkv.weight"] = torch.cat([sd.pop(p + f"attn.{n}_proj.weight") for n in "qkv"])
        # split SwiGLU (w1 / w2) -> packed fc1 = [gate | up]
        if p + "mlp.fc1.weight" in target and p + "mlp.fc1_g.weight" in sd:
            for kind in ("weight", "bias"):
                gate, up = sd.pop(p + f"mlp.fc1_g.{kind}", None), sd.pop(p + f"mlp.fc1_x.{kind}", None)
                if gate is not None and up is not None:
                    sd[p + f"mlp.fc1.{kind}"] = torch.cat([gate, up])
            if i == 0:
                report.notes.append("split SwiGLU weights concatenated into the packed fc1")
        # BEiT shared relative position bias -> a copy per block
        table_key = p + "attn.relative_position_bias_table"
        if table_key in target and table_key not in sd and "rel_pos_bias.relative_position_bias_table" in sd:
            sd[table_key] = sd["rel_pos_bias.relative_position_bias_table"].clone()
    if "rel_pos_bias.relative_position_bias_table" in sd and not any(
        k.endswith("rel_pos_bias.relative_position_bias_table") for k in target
    ):
        sd.pop("rel_pos_bias.relative_position_bias_table")
        report.notes.append("shared relative position bias copied into every block")

    # final norm placement: MIM checkpoints have `norm`, classifiers with average pooling use `fc_norm`
    for have, want in (("norm", "fc_norm"), ("fc_norm", "norm")):
        model_wants = f"{want}.weight" in target and f"{have}.weight" not in target
        if model_wants and f"{have}.weight" in sd and f"{want}.weight" not in sd:
            sd[f"{want}.weight"], sd[f"{want}.bias"] = sd.pop(f"{have}.weight"), sd.pop(f"{have}.bias")
            report.notes.append(f"final `{have}` loaded as `{want}`")

    # patch-embedding bias: fold an unwanted conv bias into the patch position embeddings (exact), or supply zeros
    bias_key = "patch_embed.proj.bias"
    if bias_key in sd and bias_key not in target:
        bias = sd.pop(bias_key)
        if bool(bias.abs().max() > 0):
            if "pos_embed" not in sd:
                raise CheckpointError(
                    "checkpoint has a patch-embedding bias the model lacks, and no pos_embed to fold into."
                )
            pos = sd["pos_embed"].clone()
            pos[:, 1:] += bias.to(pos.dtype)
            sd["pos_embed"] = pos
            report.notes.append("patch-embedding conv bias folded into pos_embed (exact)")
        else:
            report.dropped[bias_key] = "all-zero conv bias, model has none"
    elif bias_key in target and bias_key not in sd and "patch_embed.proj.weight" in sd:
        sd[bias_key] = torch.zeros_like(target[bias_key])
        report.notes.append("checkpoint has no patch-embedding bias: zeros used (exact)")

    for key in list(sd):
        if key in target:
            continue
        if _DERIVED_BUFFERS.search(key):
            report.dropped[key] = "derived buffer, rebuilt by the model"
            sd.pop(key)
            continue
        for pattern, why in _PRETRAIN_ONLY:
            if pattern.search(key):
                report.dropped[key] = why
                sd.pop(key)
                break
    return sd


def _adapt_shapes(
    sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport, patch_resample: str, reset_head: bool
) -> dict[str, torch.Tensor]:
    target = model.state_dict()
    grid = model.patch_embed.grid_size
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        old = sd["pos_embed"]
        sd["pos_embed"] = resample_abs_pos_embed(old, grid, None, model.num_prefix_tokens)
        report.notes.append(f"pos_embed resampled from {old.shape[1] - 1} to {grid[0]}x{grid[1]} patches")
    key = "patch_embed.proj.weight"
    if key in sd and key in target and sd[key].ndim == 4 and sd[key].shape[1] != target[key].shape[1]:
        old_chans = sd[key].shape[1]
        sd[key] = adapt_input_channels(sd[key], target[key].shape[1])
        report.notes.append(f"patch kernel adapted from {old_chans} to {target[key].shape[1]} input channels")
    if key in sd and key in target and sd[key].shape[-2:] != target[key].shape[-2:]:
        old_size = tuple(sd[key].shape[-2:])
        sd[key] = resample_patch_embed(sd[key], tuple(target[key].shape[-2:]), method=patch_resample)
        report.notes.append(f"patch kernel resized {old_size} -> {tuple(target[key].shape[-2:])} ({patch_resample})")
    for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
        if key in target and sd[key].shape != target[key].shape:
            side = int(round(((sd[key].shape[0] - NUM_EXTRA) ** 0.5 + 1) / 2))
            window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
            sd[key] = resize_rel_pos_bias_table(sd[key], (side, side), window)
            if "relative position tables resized" not in " ".join(report.notes):
                report.notes.append(f"relative position tables resized from a {side}x{side} to a {window} window")
    if reset_head:
        for key in ("head.weight", "head.bias"):
            if key in sd:
                report.dropped[key] = "classifier replaced (num_classes differs from the checkpoint)"
                sd.pop(key)
    return sd


def convert_state_dict(
    state_dict: dict[str, Any],
    model: nn.Module,
    source_format: str | None = None,
    patch_resample: str = "bicubic",
    reset_head: bool = False,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Convert a raw state_dict (any supported layout) to ``model``'s keys and shapes. Returns it with a report."""
    report = LoadReport()
    sd = {k: _to_tensor(v) for k, v in state_dict.items()}
    if any(k.startswith("vit.blocks.") for k in sd):
        sd = _convert_mindformers(sd, report)
    elif source_format == "paddle":
        sd = _convert_paddle(sd, report)
    sd = _rename(_strip_prefix(sd, report))
    sd = _adapt_to_model(sd, model, report)
    sd = _adapt_shapes(sd, model, report, patch_resample, reset_head)
    return sd, report


# ---------------------------------------------------------------------------------------------- loading

PATCH_RESAMPLE_METHODS = ("bicubic", "pinv")

# parameters a checkpoint may lack without making it unusable: pretraining heads a fine-tuned release drops
PRETRAINING_ONLY_KEYS = {
    "mask_token": "MIM mask token",
    "lm_head.weight": "MIM regression head",
    "lm_head.bias": "MIM regression head",
}


def _size_of(sd: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """(embedding width, number of blocks) of a timm-layout state_dict."""
    patch = sd.get("patch_embed.proj.weight")
    depth = len({m[1] for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    return (int(patch.shape[0]) if patch is not None else None), depth


_SIZE_NAMES = {(192, 12): "Ti", (384, 12): "S", (768, 12): "B", (1024, 24): "L", (1280, 32): "H", (1408, 40): "g"}


def _likely_cause(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: LoadReport) -> str | None:
    """One sentence on why a checkpoint does not fit: another model size, or a checkpoint without a classifier."""
    got, want = _size_of(sd), _size_of(target)
    if got[0] is not None and got != want:

        def describe(size: tuple[int | None, int]) -> str:
            name = _SIZE_NAMES.get(size)  # type: ignore[arg-type]
            return f"width {size[0]}, depth {size[1]}" + (f": ViT-{name} size" if name else "")

        return (
            f"the checkpoint is for another model size ({describe(got)}) than this model ({describe(want)}); "
            "create the model the checkpoint was trained as."
        )
    head_keys = {"head.weight", "head.bias"}
    if head_keys & set(report.missing) and not (set(report.missing) - head_keys):
        return (
            "the checkpoint has no classifier (a pretraining, MIM or headless checkpoint): pass reset_head=True to "
            "keep this model's newly initialized head, or create the model with num_classes=0."
        )
    if any(key.startswith("head.") for key, _, _ in report.mismatched):
        return "the classifier has another number of classes: pass reset_head=True to keep this model's new head."
    return None


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | dict[str, Any],
    strict: bool = True,
    state_dict_key: str | None = None,
    patch_resample: str = "bicubic",
    reset_head: bool = False,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load a checkpoint file (or an in-memory state_dict) into ``model``, converting it as needed.

    Args:
        model: a vitfast model.
        checkpoint: path to a ``.safetensors``/``.pth``/``.bin``/``.pdparams``/``.npz`` file, or a state_dict.
        strict: raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped key.
        state_dict_key: entry of a wrapped checkpoint to use (default: ``state_dict``, ``model``, ``module``,
            then ``model_ema``).
        patch_resample: how to resize a patch kernel of another size: ``"bicubic"`` or ``"pinv"``.
        reset_head: drop the checkpoint's classifier (use when the model has another ``num_classes``).
        trust_pickle: allow arbitrary pickled objects in ``.pth`` files (only for files you trust).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_checkpoint: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(checkpoint, dict | str | os.PathLike):
        raise TypeError(
            f"checkpoint must be a file path or a state_dict (a dict of tensors), got {type(checkpoint).__name__}."
        )
    if patch_resample not in PATCH_RESAMPLE_METHODS:
        raise ValueError(f"patch_resample must be one of {PATCH_RESAMPLE_METHODS}, got {patch_resample!r}.")
    if isinstance(checkpoint, dict):
        raw, where = dict(checkpoint), "state_dict"
    else:
        raw, where = read_checkpoint(checkpoint, trust_pickle=trust_pickle), str(checkpoint)
    state_dict, source_format = _extract_state_dict(raw, state_dict_key)
    sd, report = convert_state_dict(state_dict, model, source_format, patch_resample, reset_head)

    target = model.state_dict()
    for key in sorted(set(target) - set(sd)):
        if key in PRETRAINING_ONLY_KEYS:
            report.initialized[key] = PRETRAINING_ONLY_KEYS[key]
        elif reset_head and key.startswith("head."):
            continue
        else:
            report.missing.append(key)
    report.unexpected = sorted(set(sd) - set(target))
    shared = sorted(set(sd) & set(target))
    report.mismatched = [
        (k, tuple(sd[k].shape), tuple(target[k].shape)) for k in shared if sd[k].shape != target[k].shape
    ]
    if strict and not report.ok:
        cause = _likely_cause(sd, target, report)
        error = CheckpointError(
            f"checkpoint {where} does not fit {type(model).__name__}:\n{report.summary()}"
            + (f"\nLikely cause: {cause}" if cause else "")
            + "\n(the full list: the exception's .report, or load_checkpoint(..., strict=False) to load what fits)"
        )
        error.report = report
        raise error
    loadable = {k: v for k, v in sd.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(loadable, strict=False)
    if report.initialized:
        logger.warning("loaded %s with parameters left at initialization: %s", where, ", ".join(report.initialized))
    logger.info("loaded %s\n%s", where, report)
    return report


def _download(weights: Any) -> str:
    """Fetch a weights file (Hugging Face Hub or URL), honouring the local caches. Returns its path."""
    if weights.hub_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        filenames = [weights.filename] if weights.filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            try:
                return hf_hub_download(weights.hub_id, filename)
            except LocalEntryNotFoundError as exc:
                raise PretrainedDownloadError(
                    f"pretrained weights {weights.hub_id}/{filename} are not in the local Hugging Face cache and could "
                    f"not be downloaded (offline?): {exc}. Download the file where you have network access, then "
                    "load it with vitfast.load_checkpoint(model, path)."
                ) from exc
            except EntryNotFoundError:
                continue
            except Exception as exc:
                raise PretrainedDownloadError(
                    f"could not download pretrained weights from the Hugging Face Hub repo {weights.hub_id} "
                    f"({type(exc).__name__}: {exc}). With the file at hand, use vitfast.load_checkpoint(model, path)."
                ) from exc
        raise PretrainedDownloadError(f"Hugging Face Hub repo {weights.hub_id} has none of the files {filenames}.")

    cache_dir = Path(torch.hub.get_dir()) / "checkpoints" / "vitfast"
    destination = cache_dir / weights.url.rsplit("/", 1)[-1]
    if destination.is_file():
        return str(destination)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(weights.url, str(destination), progress=True)
    except Exception as exc:
        raise PretrainedDownloadError(
            f"could not download pretrained weights from {weights.url} ({type(exc).__name__}: {exc}). Download the "
            f"file where you have network access, then load it with vitfast.load_checkpoint(model, path)."
        ) from exc
    return str(destination)


def load_pretrained(model: nn.Module, weights: Any, **kwargs: Any) -> LoadReport:
    """Download ``weights`` (a :class:`vitfast.models.Weights`) if needed and load them strictly into ``model``."""
    path = _download(weights)
    kwargs.setdefault("state_dict_key", weights.state_dict_key)
    return load_checkpoint(model, path, **kwargs)
