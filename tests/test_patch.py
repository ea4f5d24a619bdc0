"""``vitfast.patch`` on timm models: same parameters and keys, same outputs and gradients, reversible."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch

import vitfast
from tests.helpers import assert_close_scaled, assert_kernel_close, randomize_

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
BF16_EPS = torch.finfo(torch.bfloat16).eps  # the error floor of a bf16 computation (autocast)

# narrow two-block copies: every patched layer type is on the path (2 heads of 64)
TIMM_MODELS = {
    "vit_base_patch16_224": dict(img_size=112),
    "vit_base_patch16_clip_224": dict(img_size=112),  # pre-norm, GELU
    "beitv2_base_patch16_224": dict(img_size=112),  # relative position bias, gamma layer scale
    "eva02_base_patch14_224": dict(img_size=112),  # RoPE, SwiGLU with sub-LN, split q/k/v
    "eva02_tiny_patch14_224": dict(img_size=112),  # RoPE, packed SwiGLU
}


def _timm_model(name: str, **extra) -> torch.nn.Module:
    width = dict(embed_dim=768, num_heads=12) if CUDA else dict(embed_dim=128, num_heads=2)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=7, **TIMM_MODELS[name], **width, **extra)
    return randomize_(model)


def _forward_backward(model, image, backend="reference"):
    """Output and gradients, of every parameter and of the input (key ``"input"``), for a fixed random cotangent."""
    model.zero_grad(set_to_none=True)
    image = image.detach().requires_grad_()
    with vitfast.use_backend(backend):
        out = model(image)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads | {"input": image.grad}


def _autograd_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``out`` was computed through."""
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


RECOMPUTING_NODES = {"RecomputedLinearBackward", "ResidualNormBackward"}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_patched_model_keeps_parameters_and_matches_on_the_reference_path(name) -> None:
    model = _timm_model(name)
    image = torch.randn(2, 3, 112, 112)
    expected, expected_grads = _forward_backward(model, image)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())

    assert vitfast.patch(model) is model
    assert model.vitfast_patch_summary.swapped, "nothing was swapped"
    assert dict(model.named_parameters()) == params, "the same Parameter objects, under the same names"
    assert list(model.state_dict()) == keys
    assert _autograd_nodes(model(image)) >= RECOMPUTING_NODES, "recompute (the default) did not run"
    out, grads = _forward_backward(model, image)
    assert_close_scaled(out, expected, tol=1e-6, what=f"{name} logits")
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert_close_scaled(grad, expected_grads[key], tol=1e-5, what=f"{name} grad {key}")

    vitfast.unpatch(model)
    assert not any(type(m).__name__.startswith("Vitfast") for m in model.modules())
    torch.testing.assert_close(_forward_backward(model, image)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "eva02_base_patch14_224" else n for n in TIMM_MODELS]
)
def test_patched_model_on_the_kernels_matches_timm(name) -> None:
    """Through Triton's interpreter on the CPU (fp32), the compiled kernels on a GPU (bf16)."""
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    model = _timm_model(name).to(device)
    image = torch.randn(2, 3, 112, 112, device=device)
    expected, expected_grads = _forward_backward(copy.deepcopy(model).double(), image.double())
    model = model.to(dtype)
    baseline, baseline_grads = _forward_backward(model, image.to(dtype))
    vitfast.patch(model)
    actual, actual_grads = _forward_backward(model, image.to(dtype), backend="triton")
    assert_kernel_close(actual, expected, baseline, what=f"{name} logits")
    for key, grad in actual_grads.items():
        assert_kernel_close(grad, expected_grads[key], baseline_grads[key], what=f"{name} grad {key}")


def test_recompute_false_saves_what_the_ops_save_with_the_same_results() -> None:
    model = _timm_model("vit_base_patch16_224")
    image = torch.randn(2, 3, 112, 112)
    recomputing = vitfast.patch(copy.deepcopy(model))
    plain = vitfast.patch(copy.deepcopy(model), recompute=False)
    assert not RECOMPUTING_NODES & _autograd_nodes(plain(image))
    assert "_RecomputedFromInputBackward" not in _autograd_nodes(plain(image))
    expected, expected_grads = _forward_backward(recomputing, image)
    out, grads = _forward_backward(plain, image)
    assert_close_scaled(out, expected, tol=1e-6, what="logits")
    for key, grad in grads.items():
        assert_close_scaled(grad, expected_grads[key], tol=1e-5, what=f"grad {key}")
    with torch.no_grad():  # nothing is saved without grad: the plain forward
        assert recomputing(image).grad_fn is None
    assert "_vitfast_recompute" not in vars(vitfast.unpatch(recomputing).blocks[0])


def _block_and_kwargs(name: str):
    """The second block of a tiny two-block model, its input and the keyword arguments the model passes it."""
    model = _timm_model(name)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(torch.randn(2, 3, 112, 112)))
    kwargs = {}
    if isinstance(tokens, tuple):  # EVA's returns (tokens, RoPE table)
        tokens, rope = tokens
        kwargs = {"rope": rope}
    return model.blocks[1], tokens, kwargs


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "eva02_base_patch14_224"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_around_a_patched_block_keeps_its_gradients(name, use_reentrant) -> None:
    """torch.utils.checkpoint around a recomputing block: the forward runs twice (once without saving, or without
    grad when reentrant), the gradients of the block's parameters and input are those of the plain call."""
    block, tokens, kwargs = _block_and_kwargs(name)
    cotangent = torch.randn(tokens.shape)

    def gradients(run):  # by .backward(): reentrant checkpointing refuses torch.autograd.grad
        x = tokens.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = run(x)
        out.backward(cotangent)
        return out.detach(), [x.grad, *(p.grad for p in block.parameters())]

    expected, expected_grads = gradients(lambda x: block(x, **kwargs))
    vitfast.patch(block)
    patched, patched_grads = gradients(lambda x: block(x, **kwargs))
    call = functools.partial(block, **kwargs)  # reentrant checkpointing passes no keyword arguments on
    checkpointed, grads = gradients(lambda x: torch.utils.checkpoint.checkpoint(call, x, use_reentrant=use_reentrant))
    torch.testing.assert_close(checkpointed, patched, rtol=0, atol=0)
    assert_close_scaled(patched, expected, tol=1e-6, what="block output")
    for grad, patched_grad, expected_grad in zip(grads, patched_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, patched_grad, rtol=1e-6, atol=1e-7)
        assert_close_scaled(grad, expected_grad, tol=1e-5, what="checkpointed block grad")


def test_patch_twice_is_a_no_op_and_the_summary_says_what_was_left_alone(capsys) -> None:
    model = _timm_model("vit_base_patch16_224")
    vitfast.patch(model, verbose=True)
    printed = capsys.readouterr().out
    assert "Attention x2" in printed and "Block x2" in printed and "LayerNorm x5" in printed
    assert "Mlp x2" in printed and "PatchEmbed" in printed
    classes = [type(m) for m in model.modules()]
    vitfast.patch(model)
    assert [type(m) for m in model.modules()] == classes
    summary = model.vitfast_patch_summary
    assert not summary.swapped and summary.already_patched == 2 + 2 + 5 + 2  # attention, blocks, norms, MLPs
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        vitfast.patch("vit_base_patch16_224")


def test_calls_the_kernels_do_not_cover_run_the_original_forward() -> None:
    model = _timm_model("vit_base_patch16_224").eval()
    block = model.blocks[0]
    tokens = torch.randn(2, 50, 128)
    mask = torch.zeros(2, 1, 50, 50)
    mask[..., -5:] = float("-inf")  # hide the last five tokens
    with torch.no_grad():
        expected = block.attn(tokens, attn_mask=mask)
        vitfast.patch(model)
        assert type(block.attn).__name__ == "VitfastAttention"
        with vitfast.use_backend("triton"):
            torch.testing.assert_close(block.attn(tokens, attn_mask=mask), expected, rtol=0, atol=0)
            # the block falls back as a whole too (its norms still run the LayerNorm kernel)
            assert_close_scaled(
                block(tokens, attn_mask=mask),
                model.blocks[0].__class__.__mro__[1].forward(block, tokens, attn_mask=mask),
                tol=0,
            )


def test_grad_checkpointing_still_works_after_patching() -> None:
    model = _timm_model("eva02_base_patch14_224")
    image = torch.randn(2, 3, 112, 112)
    vitfast.patch(model)
    expected, expected_grads = _forward_backward(model, image)
    model.set_grad_checkpointing(True)
    out, grads = _forward_backward(model, image)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unaligned_swiglu_width_runs_padded_with_timm_results(backend, monkeypatch) -> None:
    """EVA-02-L's MLP (hidden int(dim * 8 / 3): 2730 at dim 1024, 341 at dim 128) runs its GEMMs at the next multiple
    of 8 (one concatenated fc1 GEMM, padded weights per call); outputs and every parameter gradient match timm's
    unpadded model, and the parameters keep timm's shapes."""
    model = timm.create_model(
        "eva02_large_patch14_224", pretrained=False, depth=1, num_classes=7, img_size=56, embed_dim=128, num_heads=2
    )
    # fp64 on the reference path, fp32 on the kernels (they take no fp64); the patched attention rotates with fp32
    # RoPE tables, as on every patched path (test_patched_model_keeps_parameters_and_matches_on_the_reference_path)
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = randomize_(model).to(dtype)
    mlp = model.blocks[0].mlp
    width = mlp.fc1_g.out_features
    assert width % 8, "the case needs an unaligned hidden width"
    shapes = {name: p.shape for name, p in model.named_parameters()}
    image = torch.randn(2, 3, 56, 56, dtype=dtype)
    expected, expected_grads = _forward_backward(model, image)
    vitfast.patch(model)
    hidden_widths = []
    original_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, w, b=None: hidden_widths.append(w.shape) or original_linear(x, w, b)
    )
    out, grads = _forward_backward(model, image, backend)
    monkeypatch.undo()
    assert (2 * (width + (-width % 8)), 128) in hidden_widths, "fc1 did not run as one padded GEMM"
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    assert_close_scaled(out, expected, tol=1e-6, what="logits")
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert grad.shape == expected_grads[key].shape, key
        assert_close_scaled(grad, expected_grads[key], tol=1e-5, what=f"grad {key}")


def test_a_few_training_steps_match_the_unpatched_model() -> None:
    """The convergence check: same seed, same data, a few SGD steps, losses and weights stay together.

    SGD rather than Adam: Adam's per-parameter normalization turns fp32 rounding noise in near-zero gradients into
    full-size updates, which would compare the optimizer's amplification, not the kernels.
    """
    reference = _timm_model("beitv2_base_patch16_224")
    patched = vitfast.patch(copy.deepcopy(reference))
    data = torch.randn(4, 2, 3, 112, 112)
    labels = torch.randint(0, 7, (4, 2))

    def train(model, backend):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for step in range(4):
            with vitfast.use_backend(backend):
                loss = torch.nn.functional.cross_entropy(model(data[step]), labels[step])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    expected = train(reference, "reference")
    actual = train(patched, "triton")
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        assert_close_scaled(p.detach(), q.detach(), tol=1e-4, what=name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch.compile of the Triton ops needs a GPU (the interpreter cannot trace them)")
def test_compiled_patched_model_has_no_graph_break() -> None:
    model = _timm_model("eva02_base_patch14_224").cuda().to(torch.bfloat16)
    vitfast.patch(model, backend="auto")
    image = torch.randn(2, 3, 112, 112, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(image)
    out.float().sum().backward()
    assert_close_scaled(out.float(), model(image).float(), tol=2e-2, what="compiled vs eager")


FSDP_STEPS = 3


def _fsdp_train(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """``FSDP_STEPS`` SGD steps on a mean-squared output; the loss of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(FSDP_STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model(images).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _gloo_worker(rank: int, world_size: int, port: int, results) -> None:
    """One rank of both distributed runs, in one process group (one spawn of processes that import torch, not two):
    DDP's gradients of one step, then FSDP2's losses and gathered parameters after ``FSDP_STEPS`` steps."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        images = torch.randn(world_size * 2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
        mine = images[rank * 2 : rank * 2 + 2]
        torch.manual_seed(0)
        model = vitfast.patch(_timm_model("eva02_tiny_patch14_224"))
        ddp_model = DistributedDataParallel(model)  # kept: its reducer must outlive the backward
        ddp_model(mine).square().mean().backward()
        ddp = {name: p.grad.clone() for name, p in model.named_parameters()}

        torch.manual_seed(0)
        model = vitfast.patch(_timm_model("eva02_tiny_patch14_224"))
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        losses = _fsdp_train(model, mine)
        # the sharded parameters gathered back, to compare with one process's after the same steps
        params = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        results[rank] = {"ddp": ddp, "fsdp_losses": losses, "fsdp_params": params}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_ranks() -> dict:
    """What each of two gloo processes on the CPU (reference path) got in :func:`_gloo_worker`, by rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(2, port, results), nprocs=2, join=True)
    return dict(results)


def _one_process_model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = vitfast.patch(_timm_model("eva02_tiny_patch14_224"))
    return model, torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_distributed_data_parallel_averages_the_patched_gradients(gloo_ranks: dict) -> None:
    """DDP's averaged gradients on two ranks equal one process's on the full batch."""
    model, images = _one_process_model()
    model(images).square().mean().backward()
    for name, p in model.named_parameters():
        for rank in range(2):
            assert_close_scaled(gloo_ranks[rank]["ddp"][name], p.grad, tol=1e-5, what=f"rank {rank} {name}")


@pytest.mark.slow
def test_fsdp2_fully_shard_trains_the_patched_model_as_one_process(gloo_ranks: dict) -> None:
    """``fully_shard`` per block and on the root, two ranks: the mean of the two ranks' losses is one process's loss
    on the whole batch at every step, and the parameters after the steps are the same."""
    model, images = _one_process_model()
    expected = _fsdp_train(model, images)
    sharded = [(a + b) / 2 for a, b in zip(gloo_ranks[0]["fsdp_losses"], gloo_ranks[1]["fsdp_losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(sharded), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert expected[-1] < expected[0], "the steps did not train (the comparison would be of untouched weights)"
    for name, p in model.named_parameters():
        for rank in range(2):
            assert_close_scaled(gloo_ranks[rank]["fsdp_params"][name], p.detach(), tol=1e-5, what=f"rank {rank} {name}")


@pytest.mark.parametrize(
    "name", ["vit_base_patch16_clip_224", pytest.param("eva02_base_patch14_224", marks=pytest.mark.slow)]
)
def test_patched_model_under_autocast(name) -> None:
    """bf16 autocast (CPU here, CUDA on a GPU): the kernels take autocast's bf16 activations with fp32 parameters."""
    device = "cuda" if CUDA else "cpu"
    model = _timm_model(name).to(device)
    image = torch.randn(2, 3, 112, 112, device=device)
    expected, expected_grads = _forward_backward(copy.deepcopy(model).double(), image.double())
    with torch.autocast(device, dtype=torch.bfloat16):
        baseline, baseline_grads = _forward_backward(model, image)
        vitfast.patch(model)
        actual, actual_grads = _forward_backward(model, image, backend="triton")
    assert actual.dtype == baseline.dtype
    assert_kernel_close(actual.float(), expected, baseline.float(), floor=BF16_EPS, what=f"{name} autocast logits")
    for key, grad in actual_grads.items():
        assert grad.dtype == torch.float32, "parameter gradients stay in the parameters' dtype"
        assert_kernel_close(grad, expected_grads[key], baseline_grads[key], floor=BF16_EPS, what=f"{name} grad {key}")


def test_multihead_attention_self_attention_is_patched_and_other_calls_fall_back() -> None:
    """open_clip's native towers call ``nn.MultiheadAttention(x, x, x, need_weights=False)`` batch-first."""
    mha = randomize_(torch.nn.MultiheadAttention(128, 2, batch_first=True))
    x = torch.randn(2, 50, 128, requires_grad=True)
    expected = mha(x, x, x, need_weights=False)[0]
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, mha.in_proj_weight, mha.out_proj.weight])
    masked = mha(x, x, x, need_weights=False, attn_mask=torch.zeros(50, 50))[0]
    weights = mha(x, x, x)[1]

    vitfast.patch(mha)
    with vitfast.use_backend("triton"):
        out, none = mha(x, x, x, need_weights=False)
        assert none is None
        assert_close_scaled(out, expected, tol=1e-5, what="patched MHA")
        grads = torch.autograd.grad(out.square().sum(), [x, mha.in_proj_weight, mha.out_proj.weight])
        for grad, reference in zip(grads, expected_grads, strict=True):
            assert_close_scaled(grad, reference, tol=1e-5, what="patched MHA grad")
        torch.testing.assert_close(mha(x, x, x, need_weights=False, attn_mask=torch.zeros(50, 50))[0], masked)
        torch.testing.assert_close(mha(x, x, x)[1], weights)  # attention weights requested: the original path


def test_layer_norm_variants_with_other_semantics_are_left_alone() -> None:
    from timm.layers import LayerNorm2d

    model = torch.nn.Sequential(LayerNorm2d(8), torch.nn.LayerNorm((4, 8)), torch.nn.LayerNorm(8))
    vitfast.patch(model)
    assert [type(m).__name__ for m in model] == ["LayerNorm2d", "LayerNorm", "VitfastLayerNorm"]
    assert "LayerNorm2d" in model.vitfast_patch_summary.left_alone


def test_open_clip_native_tower_attention_and_norms_are_patched() -> None:
    open_clip = pytest.importorskip("open_clip")
    tower = randomize_(
        open_clip.transformer.VisionTransformer(
            image_size=64, patch_size=16, width=128, layers=2, heads=2, mlp_ratio=4.0, output_dim=32
        )
    ).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tower(image)
        vitfast.patch(tower)
        assert tower.vitfast_patch_summary.swapped["MultiheadAttention"] == 2
        with vitfast.use_backend("triton"):
            assert_close_scaled(tower(image), expected, tol=1e-5, what="open_clip tower")


def test_a_patched_model_pickles_deep_copies_and_loads_back_patched_or_unpatched(tmp_path) -> None:
    """torch.save / pickle (multiprocessing's spawn pickles the same way) and copy.deepcopy keep the patched classes."""
    import pickle

    model = vitfast.patch(_timm_model("eva02_tiny_patch14_224").eval())
    image = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = model(image)
    torch.save(model, tmp_path / "model.pt")
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(tmp_path / "model.pt", weights_only=False),
    ]
    for restored in copies:
        assert type(restored.blocks[0]) is type(model.blocks[0]) and type(restored.norm) is type(model.norm)
        with torch.no_grad():
            torch.testing.assert_close(restored(image), expected, rtol=0, atol=0)
    unpatched = vitfast.unpatch(copies[-1])
    assert type(unpatched.blocks[0]).__name__ == "EvaBlock" and not hasattr(unpatched, "vitfast_patch_summary")
    with torch.no_grad():
        torch.testing.assert_close(unpatched(image), expected, rtol=1e-6, atol=1e-6)
