"""Swap vitfast's fused ops into an existing timm model in place: ``vitfast.patch(model)``, ``vitfast.unpatch(model)``.

Each supported module keeps its identity, its parameters, buffers, hooks and ``state_dict`` keys: only its class is
swapped for a subclass whose ``forward`` calls :mod:`vitfast.ops` (so optimizer state, checkpoints and
``model.blocks[i]`` references stay valid), and :func:`unpatch` swaps the original class back. A call the fused path
does not cover (an attention mask, a causal flag, BEiT's shared relative position bias, half-rotation RoPE, an active
dropout between SwiGLU and its norm, ...) runs the module's original ``forward``, so results never change meaning.

Supported (timm >= 1.0): ``nn.LayerNorm`` over one dimension (timm's LayerNorm included); ``timm.layers.Attention``
(ViT, CLIP, MAE, DeiT towers), BEiT's ``Attention`` (relative position bias read inside the kernel) and ``EvaAttention``
(RoPE by the one-pass ``rope_2d_qk`` kernel, then attention; split q / k / v as one GEMM); ``SwiGLU`` (split,
with the fused sub-LN; widths that are not a multiple of 8 zero-padded to one, see ``_padded_swiglu_mlp``) and
``GluMlp`` with SiLU (packed); the ViT ``Block``, BEiT ``Block`` and ``EvaBlock`` (first residual add, layer scale
and ``norm2`` fused); and ``nn.MultiheadAttention`` called as batch-first self-attention without masks or weights
(open_clip's native towers: their attention and LayerNorms are patched, their blocks are not).

Training saves less by default (``patch(model, recompute=True)``, :mod:`vitfast.layers.recompute`): a patched
LayerNorm's output carries how it was made, and the patched q/k/v or fc1 GEMM that reads it saves the LayerNorm's
inputs instead and recomputes it in backward; the patched blocks save the residual stream's terms rather than their
sum; fc2 recomputes its activation from fc1's output. A module with hooks on the way keeps its module call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitfast import ops
from vitfast.backend import set_backend
from vitfast.layers.recompute import (
    ResidualNorm,
    has_hooks,
    normalized_linear,
    recomputed_linear,
    tag_normalization,
)
from vitfast.ops.swiglu import aligned_width

__all__ = ["PatchSummary", "patch", "unpatch"]

_ORIGINAL = "_vitfast_original_class"
_RECOMPUTE = "_vitfast_recompute"
_classes: dict[tuple[type, str], type] = {}


def _original_forward(module: nn.Module, *args, **kwargs):
    return getattr(type(module), _ORIGINAL).forward(module, *args, **kwargs)


def _recomputing(module: nn.Module) -> bool:
    """Whether ``module`` (patched with ``recompute=True``) saves less and recomputes in backward on this call: only
    when autograd records (nothing to save otherwise), and not under torch.compile, whose partitioner chooses what
    to save and recompute in the graphs it builds."""
    return module.__dict__.get(_RECOMPUTE, False) and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _only_defaults(args: tuple, kwargs: dict) -> bool:
    """Whether the extra arguments of a call are all absent (None / False): the case the fused path covers."""
    return not args and all(value is None or value is False for value in kwargs.values())


# --------------------------------------------------------------------------------------------- forwards


def _layer_norm_of(eps: float) -> Callable:
    def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.layer_norm(x, weight, bias, eps)

    return layer_norm


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    out = ops.layer_norm(x, self.weight, self.bias, self.eps)
    if _recomputing(self):  # the GEMM that reads it (qkv, fc1) then saves x, not out
        tag_normalization(out, _layer_norm_of(self.eps), (x, self.weight, self.bias))
    return out


def _qkv_heads(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, D]`` as strided views of the projection (timm's fused, q/v-bias and split layouts)."""
    batch, tokens, _ = x.shape
    recompute = _recomputing(self)
    if getattr(self, "qkv", None) is None:  # EVA-02 B/L: separate projections, run as one GEMM
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if recompute:
            params = [proj.weight for proj in projections] + [proj.bias for proj in projections]
            qkv = normalized_linear(x, _stacked_projections(0), params)
        else:
            qkv = F.linear(x, torch.cat([proj.weight for proj in projections]), _concatenated_bias(projections))
    elif getattr(self, "q_bias", None) is None:
        if recompute and not has_hooks(self.qkv):
            qkv = normalized_linear(x, None, (self.qkv.weight, self.qkv.bias))
        else:
            qkv = self.qkv(x)
    elif recompute:
        qkv = normalized_linear(x, _with_qkv_bias, (self.qkv.weight, self.q_bias, self.k_bias, self.v_bias))
    else:
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
    return qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _with_qkv_bias(weight: torch.Tensor, q_bias, k_bias, v_bias) -> tuple[torch.Tensor, torch.Tensor]:
    return weight, torch.cat((q_bias, k_bias, v_bias))


def _stacked_projections(pad: int) -> Callable:
    """``(*weights, *biases) -> (weight, bias)`` of one GEMM for several projections of one input: the weights
    stacked, each zero-padded by ``pad`` output rows, the biases likewise (a missing one as zeros; None if all are)."""

    def stacked(*params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights, biases = params[: len(params) // 2], params[len(params) // 2 :]
        weight = torch.cat([F.pad(w, (0, 0, 0, pad)) for w in weights])
        if all(b is None for b in biases):
            return weight, None
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases, strict=True)]
        return weight, torch.cat([F.pad(b, (0, pad)) for b in biases])

    return stacked


def _concatenated_bias(layers: tuple[nn.Linear, ...], pad: int = 0) -> torch.Tensor | None:
    """The biases of ``layers`` end to end (a missing one as zeros, e.g. EVA-02's key projection), each followed by
    ``pad`` zeros; None when no layer has a bias."""
    if all(layer.bias is None for layer in layers):
        return None
    biases = [layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features) for layer in layers]
    return torch.cat([F.pad(bias, (0, pad)) for bias in biases])


def _attention_out(self: nn.Module, out: torch.Tensor) -> torch.Tensor:
    batch, _, tokens, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    out = getattr(self, "norm", nn.Identity())(out)
    return self.proj_drop(self.proj(out))


def _attention_dropout(self: nn.Module) -> float:
    return self.attn_drop.p if self.training else 0.0


def _vit_attention_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _only_defaults(args, kwargs) or getattr(self, "gate", None) is not None:
        return _original_forward(self, x, *args, **kwargs)
    q, k, v = _qkv_heads(self, x)
    q, k = self.q_norm(q), self.k_norm(k)
    out = ops.attention(q, k, v, scale=self.scale, dropout_p=_attention_dropout(self))
    return _attention_out(self, out)


def _beit_attention_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    table = self.relative_position_bias_table
    index = getattr(self, "relative_position_index", None)
    if not _only_defaults(args, kwargs) or (table is not None and index.shape[0] != x.shape[1]):
        return _original_forward(self, x, *args, **kwargs)
    q, k, v = _qkv_heads(self, x)
    out = ops.attention(
        q,
        k,
        v,
        scale=self.scale,
        rel_pos_bias_table=table,
        rel_pos_index=index if table is not None else None,
        dropout_p=_attention_dropout(self),
    )
    return _attention_out(self, out)


def _eva_attention_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None, *args, **kwargs):
    unsupported = (
        not _only_defaults(args, kwargs)
        or getattr(self, "gate", None) is not None
        or getattr(self, "rotate_half", False)
        or (rope is not None and (not isinstance(rope, torch.Tensor) or rope.ndim != 2))
    )
    if unsupported:
        return _original_forward(self, x, rope, *args, **kwargs)
    q, k, v = _qkv_heads(self, x)
    q, k = self.q_norm(q), self.k_norm(k)
    tables = None
    if rope is not None:  # timm's layout: cat([sin, cos], -1), both repeated per interleaved channel pair
        sin, cos = rope.float().tensor_split(2, dim=-1)
        tables = (cos, sin)
        if _recomputing(self):
            # attention saves the rotated q and k (new tensors) and v: a view of v would keep the whole q/k/v
            # projection alive until backward, a copy of v (one [B, N, C] write) keeps a third of it
            v = v.transpose(1, 2).contiguous().transpose(1, 2)
    out = ops.attention(
        q,
        k,
        v,
        scale=self.scale,
        rope=tables,
        num_prefix_tokens=self.num_prefix_tokens,
        dropout_p=_attention_dropout(self),
    )
    return _attention_out(self, out)


def _multihead_attention_forward(self: nn.MultiheadAttention, query, key, value, *args, **kwargs):
    """``nn.MultiheadAttention`` used as batch-first self-attention without masks (open_clip's native towers)."""
    covered = (
        query is key is value
        and self.batch_first
        and self._qkv_same_embed_dim
        and query.ndim == 3
        and not args
        and kwargs.get("need_weights", True) is False
        and all(kwargs.get(name) is None for name in ("key_padding_mask", "attn_mask"))
        and not kwargs.get("is_causal", False)
        and self.bias_k is None
        and not self.add_zero_attn
    )
    if not covered:
        return _original_forward(self, query, key, value, *args, **kwargs)
    batch, tokens, _ = query.shape
    if _recomputing(self):
        qkv = normalized_linear(query, None, (self.in_proj_weight, self.in_proj_bias))
    else:
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = ops.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    return self.out_proj(out), None


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU)


# LayerNorm subclasses known to normalize the last dimension of their input as nn.LayerNorm does (timm's LayerNorm,
# open_clip's LayerNorm / LayerNormFp32, vitfast's own); others (e.g. timm's LayerNorm2d, which permutes NCHW input)
# are left alone
_LAST_DIM_LAYER_NORMS = ("LayerNorm", "LayerNormFp32")


def _is_plain_layer_norm(module: nn.Module) -> bool:
    # a LayerNorm patched already is judged by its original class (the SwiGLU's sub-LN is patched too, and was
    # therefore never fused with the SwiGLU before this looked through the patch)
    cls = getattr(type(module), _ORIGINAL, type(module))
    return (
        isinstance(module, nn.LayerNorm)
        and len(module.normalized_shape) == 1
        and (cls.forward is nn.LayerNorm.forward or cls.__name__ in _LAST_DIM_LAYER_NORMS)
    )


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dropout_active = self.training and self.drop1.p > 0
    if not _is_silu(self.act):
        return _original_forward(self, x)
    fused_norm = _is_plain_layer_norm(self.norm) and not dropout_active
    width = self.fc1_g.out_features
    if fused_norm and self.norm.elementwise_affine and aligned_width(width) != width:
        return self.drop2(_padded_swiglu_mlp(self, x, width))
    if fused_norm and self.norm.elementwise_affine and _recomputing(self) and not _any_hooks(self):
        return self.drop2(_recomputed_swiglu_mlp(self, x, width, pad=0))
    gate, up = self.fc1_g(x), self.fc1_x(x)
    if fused_norm:
        hidden = ops.swiglu_layer_norm(gate, up, self.norm.weight, self.norm.bias, self.norm.eps)
    else:
        hidden = self.norm(self.drop1(ops.swiglu(gate, up)))
    return self.drop2(self.fc2(hidden))


def _any_hooks(self: nn.Module) -> bool:
    """Whether a submodule of an MLP has hooks: its functional form (one GEMM for two, the recomputing Functions)
    would skip them, so the module calls stay."""
    return any(has_hooks(module) for module in self.modules() if module is not self)


def _padded_swiglu_mlp(self: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))`` at the hidden width padded to a multiple of 8 (EVA-02-L: 2730 ->
    2736), so that every GEMM row is 16 bytes in 16-bit dtypes (cuBLAS ran EVA-02-L's 2730-wide GEMMs 2.7-3.2x slower
    than 2736-wide ones on the H100, PEERS.md). The weights are zero-padded on each call, fc1_g and fc1_x concatenated
    into one GEMM; the padding's outputs are exact zeros, the sub-LN normalizes the true width and writes zeros to the
    padding (``swiglu_layer_norm(width=)``), and fc2's zero columns read them: the same sums. Autograd slices the
    padding's gradients away, so the parameters and the optimizer see timm's shapes only."""
    pad = aligned_width(width) - width
    if _recomputing(self):
        return _recomputed_swiglu_mlp(self, x, width, pad)
    weight = torch.cat([F.pad(self.fc1_g.weight, (0, 0, 0, pad)), F.pad(self.fc1_x.weight, (0, 0, 0, pad))])
    gate, up = F.linear(x, weight, _concatenated_bias((self.fc1_g, self.fc1_x), pad)).chunk(2, dim=-1)
    norm = self.norm
    hidden = ops.swiglu_layer_norm(
        gate, up, F.pad(norm.weight, (0, pad)), F.pad(norm.bias, (0, pad)), norm.eps, width=width
    )
    return F.linear(hidden, F.pad(self.fc2.weight, (0, pad)), self.fc2.bias)


def _recomputed_swiglu_mlp(self: nn.Module, x: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """:func:`_padded_swiglu_mlp`'s computation (``pad`` 0: unpadded) saving fc1's output and the LayerNorm's inputs
    before it, never the sub-LN's output nor a padded or concatenated weight: both are recomputed in backward."""
    fc1_g, fc1_x, norm, fc2 = self.fc1_g, self.fc1_x, self.norm, self.fc2
    params = (fc1_g.weight, fc1_x.weight, fc1_g.bias, fc1_x.bias)
    gate, up = normalized_linear(x, _stacked_projections(pad), params).chunk(2, dim=-1)
    eps = norm.eps

    def sub_layer_norm(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        if not pad:
            return ops.swiglu_layer_norm(gate, up, weight, bias, eps)
        return ops.swiglu_layer_norm(gate, up, F.pad(weight, (0, pad)), F.pad(bias, (0, pad)), eps, width=width)

    def padded_fc2(weight: torch.Tensor, bias: torch.Tensor | None):
        return F.pad(weight, (0, pad)), bias

    return recomputed_linear(sub_layer_norm, (gate, up, norm.weight, norm.bias), padded_fc2, (fc2.weight, fc2.bias))


def _glu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _is_silu(self.act) or getattr(self, "chunk_dim", -1) != -1:
        return _original_forward(self, x)
    gate_last = self.gate_last

    def activation(hidden: torch.Tensor) -> torch.Tensor:
        if gate_last:
            up, gate = hidden.chunk(2, dim=-1)
            return ops.swiglu(gate, up)
        return ops.swiglu_packed(hidden)

    plain = isinstance(self.norm, nn.Identity) and not (self.training and self.drop1.p > 0)
    if plain and _recomputing(self) and not _any_hooks(self):
        # fc1's output saved once; the activation (fc2's input) recomputed from it in backward
        hidden = normalized_linear(x, None, (self.fc1.weight, self.fc1.bias))
        return self.drop2(recomputed_linear(activation, (hidden,), None, (self.fc2.weight, self.fc2.bias)))
    return self.drop2(self.fc2(self.norm(self.drop1(activation(self.fc1(x))))))


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Mlp``: ``fc2(act(fc1(x)))`` saving fc1's output once (the activation, fc2's input, recomputed in
    backward) and the LayerNorm's inputs rather than its output when ``x`` is one (:func:`normalized_linear`)."""
    dropout_active = self.training and isinstance(self.drop1, nn.Dropout) and self.drop1.p > 0
    plain = isinstance(self.drop1, nn.Dropout | nn.Identity) and isinstance(self.norm, nn.Identity)
    linear = isinstance(self.fc1, nn.Linear) and isinstance(self.fc2, nn.Linear)
    # the activation runs inside the recomputing Function, which sees only its argument: no parameters of its own
    stateless = next(self.act.parameters(), None) is None
    if dropout_active or not (plain and linear and stateless) or not _recomputing(self) or _any_hooks(self):
        return _original_forward(self, x)
    hidden = normalized_linear(x, None, (self.fc1.weight, self.fc1.bias))
    return self.drop2(recomputed_linear(self.act, (hidden,), None, (self.fc2.weight, self.fc2.bias)))


def _layer_scale(module: nn.Module) -> tuple[bool, torch.Tensor | None]:
    """(usable, gamma) for timm's ``ls1``: Identity -> no gamma; LayerScale -> its gamma; anything else unusable."""
    if isinstance(module, nn.Identity):
        return True, None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, torch.Tensor) and gamma.ndim == 1:
        return True, gamma
    return False, None


def _fused_residual_norm(self: nn.Module, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None):
    """``(norm2(x + gamma * branch), x + gamma * branch)`` in one op (drop path already applied to ``branch``).

    Recomputing, the sum is not saved (``x`` is, for the first half of the block, and ``branch``), and the
    normalized output carries its recipe, so that fc1 recomputes it rather than saving it."""
    norm = self.norm2
    if not _recomputing(self):
        return ops.layer_norm_residual(x, branch, gamma, norm.weight, norm.bias, norm.eps)
    normed, residual = ResidualNorm.apply(norm.eps, x, branch, gamma, norm.weight, norm.bias)
    tag_normalization(normed, _residual_layer_norm_of(norm.eps), (x, branch, gamma, norm.weight, norm.bias))
    return normed, residual


def _residual_layer_norm_of(eps: float) -> Callable:
    def residual_layer_norm(x, branch, gamma, weight, bias) -> torch.Tensor:
        return ops.layer_norm_residual(x, branch, gamma, weight, bias, eps)[0]

    return residual_layer_norm


def _vit_block_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    usable, gamma = _layer_scale(self.ls1)
    if not (usable and _only_defaults(args, kwargs) and _is_plain_layer_norm(self.norm2)):
        return _original_forward(self, x, *args, **kwargs)
    normed, x = _fused_residual_norm(self, x, self.drop_path1(self.attn(self.norm1(x))), gamma)
    return x + self.drop_path2(self.ls2(self.mlp(normed)))


def _gamma_block_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """BEiT ``Block`` and ``EvaBlock``: layer scale as ``gamma_1`` / ``gamma_2`` parameters (or None)."""
    if not (_is_plain_layer_norm(self.norm2) and not args):
        return _original_forward(self, x, *args, **kwargs)
    if "shared_rel_pos_bias" in kwargs and kwargs["shared_rel_pos_bias"] is not None:
        return _original_forward(self, x, *args, **kwargs)
    attn_kwargs = {key: value for key, value in kwargs.items() if value is not None and value is not False}
    branch = self.drop_path1(self.attn(self.norm1(x), **attn_kwargs))
    normed, x = _fused_residual_norm(self, x, branch, self.gamma_1)
    branch = self.mlp(normed)
    if self.gamma_2 is not None:
        branch = self.gamma_2 * branch
    return x + self.drop_path2(branch)


# ----------------------------------------------------------------------------------------------- rules


def _timm_rules() -> list[tuple[type, str, Callable]]:
    """(module class, kind, patched forward), most specific first; empty without timm."""
    try:
        from timm.layers import GluMlp, Mlp, SwiGLU
        from timm.layers.attention import Attention as TimmAttention
        from timm.models.beit import Attention as BeitAttention
        from timm.models.beit import Block as BeitBlock
        from timm.models.eva import EvaAttention, EvaBlock
        from timm.models.vision_transformer import Block as VitBlock
    except ImportError:
        return []
    return [
        (BeitAttention, "beit_attention", _beit_attention_forward),
        (EvaAttention, "eva_attention", _eva_attention_forward),
        (TimmAttention, "attention", _vit_attention_forward),
        (SwiGLU, "swiglu", _swiglu_forward),
        (GluMlp, "glu_mlp", _glu_mlp_forward),
        (Mlp, "mlp", _mlp_forward),
        (BeitBlock, "beit_block", _gamma_block_forward),
        (EvaBlock, "eva_block", _gamma_block_forward),
        (VitBlock, "vit_block", _vit_block_forward),
    ]


# modules with no compute of their own, or whose compute stays in PyTorch by design: not reported as missed
_PLAIN = (
    nn.Linear,
    nn.Dropout,
    nn.Identity,
    nn.Conv2d,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.GELU,
    nn.SiLU,
)


def _rule_for(module: nn.Module, rules) -> tuple[str, Callable] | None:
    for cls, kind, forward in rules:
        if type(module) is cls:  # exact type: a subclass may have its own forward
            return kind, forward
    if _is_plain_layer_norm(module):
        return "layer_norm", _layer_norm_forward
    if type(module) is nn.MultiheadAttention:
        return "multihead_attention", _multihead_attention_forward
    return None


def _forward_for(kind: str) -> Callable:
    forwards = {rule_kind: forward for _, rule_kind, forward in _timm_rules()}
    forwards |= {"layer_norm": _layer_norm_forward, "multihead_attention": _multihead_attention_forward}
    return forwards[kind]


def _new_patched(original: type, kind: str) -> nn.Module:
    """Unpickling a patched module: an empty instance of its patched class (pickle then restores its state)."""
    cls = _patched_class(original, kind, _forward_for(kind))
    return cls.__new__(cls)


def _reduce_patched(self: nn.Module, protocol: int) -> tuple:
    # the patched classes are made at run time, so pickle cannot find them by name: a patched module is pickled as
    # (its original class, the kind of patch), which torch.save, copy.deepcopy and multiprocessing all use
    cls = type(self)
    return _new_patched, (getattr(cls, _ORIGINAL), cls._vitfast_kind), self.__getstate__()


def _patched_class(original: type, kind: str, forward: Callable) -> type:
    key = (original, kind)
    if key not in _classes:
        _classes[key] = type(
            f"Vitfast{original.__name__}",
            (original,),
            {
                "forward": forward,
                _ORIGINAL: original,
                "_vitfast_kind": kind,
                "__reduce_ex__": _reduce_patched,
                "__module__": __name__,
                "__doc__": original.__doc__,
            },
        )
    return _classes[key]


@dataclass
class PatchSummary:
    """What :func:`patch` swapped (class name -> count) and what it left alone (class name -> reason)."""

    swapped: Counter = field(default_factory=Counter)
    already_patched: int = 0
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            "vitfast.patch: swapped " + (", ".join(f"{n} x{c}" for n, c in sorted(self.swapped.items())) or "nothing")
        ]
        if self.already_patched:
            lines.append(f"  {self.already_patched} module(s) were already patched (left as they are)")
        for name, reason in sorted(self.left_alone.items()):
            lines.append(f"  left alone: {name}: {reason}")
        return "\n".join(lines)


def _reason_left_alone(module: nn.Module) -> str | None:
    """Why a module with compute of its own was not swapped (None: nothing to report)."""
    name = type(module).__name__
    if isinstance(module, _PLAIN) or type(module).__module__.startswith("torch.nn.modules.activation"):
        return None
    if isinstance(module, nn.LayerNorm):
        return "not a LayerNorm over the last dimension of its input (the kernel's contract)"
    if name == "PatchEmbed":
        return "the fused patch embedding needs the model's class token and position embedding (vitfast models)"
    if name in {"LayerScale", "DropPath", "RelativePositionBias", "RotaryEmbeddingCat"}:
        return None  # folded into a patched block or attention, or kept as it is
    if "Attention" in name or "Block" in name or "Mlp" in name or "GLU" in name:
        return "not a layer variant vitfast supports (a subclass or another library's class)"
    if next(module.children(), None) is None:
        return "no vitfast layer for this type"
    return None  # a container: its children are reported


def patch(model: nn.Module, backend: str | None = None, verbose: bool = False, recompute: bool = True) -> nn.Module:
    """Swap vitfast's fused ops into ``model`` in place and return it (see the module docstring for coverage).

    ``backend``: if given, also ``vitfast.set_backend(backend)`` (process-wide; ``"triton"`` runs the Triton kernels,
    ``"auto"`` the fastest measured implementation, which in eager training is PyTorch's today). Patching a patched
    model is a no-op (to change ``recompute``, :func:`unpatch` first). ``verbose`` prints the :class:`PatchSummary`,
    which is also kept as ``model.vitfast_patch_summary``.

    ``recompute`` (default True): save less for backward in eager training by recomputing cheap steps there
    (:mod:`vitfast.layers.recompute`): the LayerNorm outputs that ``qkv`` / ``fc1`` read, the MLP activation (GELU,
    SwiGLU, SwiGLU + sub-LN) that ``fc2`` reads, the pre-norm residual sum, concatenated / padded weights; RoPE'd
    attention copies v so that the q/k/v projection is not kept. Same gradients (the recomputation repeats the
    forward's computation), for a LayerNorm or activation pass per GEMM more in backward and no GEMM twice. False:
    each op saves what it saves alone. Off under ``torch.compile`` (its partitioner chooses) and without grad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitfast.patch expects a torch.nn.Module, got {type(model).__name__}.")
    if backend is not None:
        set_backend(backend)
    rules = _timm_rules()
    summary = PatchSummary()
    for module in model.modules():
        if hasattr(type(module), _ORIGINAL):
            summary.already_patched += 1
            continue
        rule = _rule_for(module, rules)
        if rule is None:
            reason = _reason_left_alone(module)
            if reason is not None:
                summary.left_alone.setdefault(type(module).__name__, reason)
            continue
        kind, forward = rule
        original = type(module)
        module.__class__ = _patched_class(original, kind, forward)
        module.__dict__[_RECOMPUTE] = bool(recompute)
        summary.swapped[original.__name__] += 1
    model.vitfast_patch_summary = summary
    if verbose:
        print(summary)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original class of every module :func:`patch` swapped; returns ``model``."""
    for module in model.modules():
        original = getattr(type(module), _ORIGINAL, None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop(_RECOMPUTE, None)
    if hasattr(model, "vitfast_patch_summary"):
        del model.vitfast_patch_summary
    return model
