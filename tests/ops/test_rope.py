"""2D RoPE on queries and keys in one pass (``rope_2d_qk``): the Triton kernel against an fp64 reference.

Without a GPU the kernel runs through Triton's interpreter (tests/conftest.py); on a GPU machine the same tests run
the compiled kernel. Errors are bounded as in STYLE rule 5 (at most twice PyTorch's error in the same dtype, plus the
dtype's epsilon), for the outputs and for the gradients of q and k.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import assert_kernel_close
from vitfast import ops
from vitfast.backend import use_backend

pytest.importorskip("triton")

# the module, not the function of the same name that vitfast.ops exports
rope = importlib.import_module("vitfast.ops.rope")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled kernel, torch.compile, full shapes)")
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def _qk(batch, heads, grid, head_dim, num_prefix, dtype, layout):
    """q and k ``[B, H, N, D]`` as the models produce them: views into a packed qkv GEMM output, or contiguous."""
    tokens = grid[0] * grid[1] + num_prefix
    if layout == "packed":
        qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=DEVICE).to(dtype)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k
    return tuple(torch.randn(batch, heads, tokens, head_dim, device=DEVICE).to(dtype) for _ in range(2))


def _forward_backward(fn, q, k, cos, sin, num_prefix, d_q, d_k):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin, num_prefix)
    grads = torch.autograd.grad((q_out, k_out), (q, k), (d_q.to(q_out.dtype), d_k.to(k_out.dtype)))
    return {"q": q_out, "k": k_out, "d_q": grads[0], "d_k": grads[1]}


def _check_against_reference(q, k, cos, sin, num_prefix, what):
    """Outputs and q / k gradients of the kernel within rule 5 of fp64; returns the kernel's results."""
    d_q, d_k = torch.randn(q.shape, device=q.device), torch.randn(k.shape, device=k.device)
    actual = _forward_backward(_kernel, q, k, cos, sin, num_prefix, d_q, d_k)
    baseline = _forward_backward(ops.rope_2d_qk_ref, q, k, cos, sin, num_prefix, d_q, d_k)
    exact = (q.double(), k.double(), cos.double(), sin.double())
    expected = _forward_backward(ops.rope_2d_qk_ref, *exact, num_prefix, d_q, d_k)
    for key, value in actual.items():
        assert value.dtype == q.dtype and value.shape == q.shape, key
        assert_kernel_close(value, expected[key].to(q.dtype), baseline[key], what=f"{what} {key}")
    return actual


def _kernel(q, k, cos, sin, num_prefix):
    with use_backend("triton"):
        return ops.rope_2d_qk(q, k, cos, sin, num_prefix)


CASES = {
    # (batch, heads, grid, head_dim, prefix, layout): EVA-02 at 224 (16 x 16 patches, D = 64), odd grids, D = 88 and
    # 32 (BLOCK_PAIRS padding and a wider token block), no prefix token
    "eva02_224_packed": (1, 2, (16, 16), 64, 1, "packed"),
    "odd_grid_contiguous": (2, 3, (5, 9), 64, 1, "contiguous"),
    "head_dim_88": (1, 2, (7, 7), 88, 1, "packed"),
    "head_dim_32_no_prefix": (2, 1, (9, 11), 32, 0, "contiguous"),
    # the token counts of EVA-02 at 336 and 448 (577 and 1025: many token blocks, a masked tail) and 12 heads (EVA-02-B:
    # not a power of 2, the head block padded)
    "eva02_336_12_heads": (1, 12, (24, 24), 64, 1, "packed"),
    "eva02_448": (1, 1, (32, 32), 64, 1, "packed"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case, dtype) -> None:
    batch, heads, grid, head_dim, num_prefix, layout = case
    torch.manual_seed(0)
    q, k = _qk(batch, heads, grid, head_dim, num_prefix, dtype, layout)
    cos, sin = ops.rope_2d_table(grid, head_dim, device=DEVICE)
    actual = _check_against_reference(q, k, cos, sin, num_prefix, what=f"{layout} {dtype}")
    # the layout attention reads in place: [B, H, N, D] views of contiguous [B, N, H, D] tensors
    assert actual["q"].transpose(1, 2).is_contiguous() and actual["k"].transpose(1, 2).is_contiguous()
    # prefix tokens pass through unrotated, bit for bit
    assert torch.equal(actual["q"][..., :num_prefix, :], q[..., :num_prefix, :])


def test_half_width_tables_match_full_ones() -> None:
    """Tables with one angle per channel pair ([N - prefix, D // 2]) give exactly the full-width tables' result."""
    q, k = _qk(2, 3, (5, 6), 64, 1, torch.bfloat16, "packed")
    cos, sin = ops.rope_2d_table((5, 6), 64, device=DEVICE)
    full = _kernel(q, k, cos, sin, 1)
    half = _kernel(q, k, cos[:, ::2].contiguous(), sin[:, ::2].contiguous(), 1)
    for a, b in zip(full, half, strict=True):
        assert torch.equal(a, b)
    reference = ops.rope_2d_qk_ref(q, k, cos[:, ::2], sin[:, ::2], 1)
    for a, b in zip(reference, ops.rope_2d_qk_ref(q, k, cos, sin, 1), strict=True):
        assert torch.equal(a, b)


def test_backward_is_the_inverse_rotation() -> None:
    """Rotating and then applying the op's gradient map to the result gives the input back (rotations are
    orthogonal): checks the kernel's INVERSE branch on its own, in fp32."""
    torch.manual_seed(1)
    q, k = _qk(2, 2, (6, 7), 64, 1, torch.float32, "packed")
    cos, sin = ops.rope_2d_table((6, 7), 64, device=DEVICE)
    q_rot, k_rot = torch.ops.vitfast.rope_2d_qk(q, k, cos, sin, 1, False)
    q_back, k_back = torch.ops.vitfast.rope_2d_qk(q_rot, k_rot, cos, sin, 1, True)
    torch.testing.assert_close(q_back, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_back, k, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q_rot, q, atol=1e-2)  # the rotation did something


def test_fallbacks_and_errors() -> None:
    cos, sin = ops.rope_2d_table((4, 4), 64, device=DEVICE)
    q, k = torch.randn(2, 17, 64, device=DEVICE), torch.randn(2, 17, 64, device=DEVICE)
    # 3-d input: the reference runs, results identical to it
    with use_backend("triton"):
        out = ops.rope_2d_qk(q, k, cos, sin, 1)
    for a, b in zip(out, ops.rope_2d_qk_ref(q, k, cos, sin, 1), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\[N - num_prefix_tokens, D\] = \[17, 64\]"):
        ops.rope_2d_qk(q, k, cos, sin, 0)
    with pytest.raises(ValueError, match="one shape"):
        ops.rope_2d_qk(q, k[:1], cos, sin, 1)
    with pytest.raises(ValueError, match="outside"):
        ops.rope_2d_qk(q, k, cos, sin, 18)
    with pytest.raises(ValueError, match="float dtype"):
        ops.rope_2d_qk(q.long(), k.long(), cos, sin, 1)


def test_errors_of_a_kernel_call_whose_checks_run_once_a_key() -> None:
    """On the Triton backend the public wrapper tries the native entry point before its checks, whose coverage check
    runs them at a key's first call: a bad call raises the wrapper's error every time (its key is declined), and a
    good one afterwards still gives the reference's result."""
    cos, sin = ops.rope_2d_table((4, 4), 64, device=DEVICE)
    q, k = (torch.randn(2, 2, 17, 64, device=DEVICE) for _ in range(2))
    with use_backend("triton"):
        for _ in range(3):  # the fill's coverage check, then the declined key
            with pytest.raises(ValueError, match=r"\[N - num_prefix_tokens, D\] = \[17, 64\]"):
                ops.rope_2d_qk(q, k, cos, sin, 0)
            with pytest.raises(ValueError, match="outside"):
                ops.rope_2d_qk(q, k, cos, sin, 18)
        for _ in range(2):
            out = ops.rope_2d_qk(q, k, cos, sin, 1)
    for a, b in zip(out, ops.rope_2d_qk_ref(q, k, cos, sin, 1), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck_cpu() -> None:
    q, k = _qk(1, 2, (3, 5), 32, 1, torch.float32, "packed")
    cos, sin = ops.rope_2d_table((3, 5), 32, device=DEVICE)
    utils = CPU_OPCHECK if not CUDA else None
    for inverse in (False, True):
        args = (q.detach().requires_grad_(), k.detach().requires_grad_(), cos, sin, 1, inverse)
        torch.library.opcheck(torch.ops.vitfast.rope_2d_qk, args, **({"test_utils": utils} if utils else {}))


@requires_gpu
def test_full_shape_and_compile_on_gpu() -> None:
    """EVA-02-L at 448 (32 x 32 patches, 16 heads, D = 64), batch 8, bf16, read from a packed qkv buffer; and the op
    under torch.compile (fullgraph) in front of SDPA, as the engine's candidate runs it."""
    torch.manual_seed(0)
    q, k = _qk(8, 16, (32, 32), 64, 1, torch.bfloat16, "packed")
    cos, sin = ops.rope_2d_table((32, 32), 64, device="cuda")
    _check_against_reference(q, k, cos, sin, 1, what="full shape")

    def attend(q, k, v):
        q, k = torch.ops.vitfast.rope_2d_qk(q, k, cos, sin, 1, False)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    v = torch.randn_like(q)
    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=2e-2, rtol=2e-2)


def test_alignment_hint_only_where_every_hinted_stride_allows_it(monkeypatch) -> None:
    """The kernel tells Triton that q's and k's row offsets are multiples of 16 bytes (128-bit loads at D = 88) only
    when the batch, token and head strides all are: a hint that is false would make misaligned vector loads."""
    launches = []
    monkeypatch.setattr(rope, "launch", lambda kernel, grid, *args, **kwargs: launches.append(kwargs))
    cos, sin = ops.rope_2d_table((4, 4), 88)
    packed = torch.zeros(2, 17, 3, 2, 88, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D] views
    rope.rope_2d_qk_fwd(packed[0], packed[1], cos, sin, 1)
    flat = torch.zeros(2 * 2 * 17 * 88 + 4, dtype=torch.bfloat16)
    odd_batch = flat.as_strided((2, 2, 17, 88), (2993, 17 * 88, 88, 1))  # token, head strides 8k; batch odd
    rope.rope_2d_qk_fwd(odd_batch, odd_batch, cos, sin, 1)
    assert [kwargs["STRIDE_MULTIPLE"] for kwargs in launches] == [8, 1]
