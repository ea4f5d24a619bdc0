"""Fine-tune a vitfast model, or run EVA-02 masked-image-modeling pretraining steps, end to end.

    python examples/finetune.py                            # tiny 2-block ViT-S/16 at 112 px, FakeData, CPU is fine
    python examples/finetune.py --mim                      # EVA-02 MIM on eva02_tiny_patch14_224_mim
    python examples/finetune.py --model vit_base_patch16_224 --depth 12 --img-size 224 --batch-size 64 \
        --steps 1000 --device cuda                         # bf16 autocast is on by default on a GPU

Classification: AdamW over layer-decay parameter groups (vitfast.training.param_groups_layer_decay), a warmup +
cosine schedule that applies each group's lr_scale, gradient clipping, cross-entropy on torchvision's FakeData
(random images and labels; a synthetic TensorDataset when torchvision is not installed).

--mim: a *_mim model predicts, for the patches hidden by a 40% block-wise mask, the patch features of a frozen
teacher. EVA-02 uses the EVA-CLIP vision tower; here the teacher is a small randomly initialized ViT with the same
patch grid, read like EVA-CLIP's (final LayerNorm, class token dropped, linear head to the student's lm_head
width), and the loss is EVA-02's negative cosine similarity (vitfast.training.eva02_mim_loss).

Progress goes to a tqdm bar when tqdm is installed (pip install "vitfast[examples]"); the loss is printed every
--log-every steps as "step <i>/<n> loss <value> lr <head lr>".
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vitfast
from vitfast.training import BlockMaskGenerator, cosine_lr_schedule, eva02_mim_loss, param_groups_layer_decay

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="vitfast model name (default: vit_small_patch16_224, or eva02_tiny_patch14_224_mim with --mim)",
    )
    parser.add_argument("--mim", action="store_true", help="EVA-02 MIM pretraining instead of classification")
    parser.add_argument("--depth", type=int, default=2, help="number of blocks (small default so a CPU copes)")
    parser.add_argument("--img-size", type=int, default=112, help="input size; a multiple of the patch size")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the last layer (the head)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of the peak")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="layer-wise lr decay (default 0.75 for fine-tuning, 1.0 = none for --mim)",
    )
    parser.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    parser.add_argument("--mask-ratio", type=float, default=0.4, help="--mim: fraction of patches masked")
    parser.add_argument("--min-block", type=int, default=16, help="--mim: minimum patches per mask block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off otherwise)",
    )
    parser.add_argument(
        "--data",
        choices=("fake", "synthetic"),
        default="fake",
        help="fake: torchvision FakeData (falls back to synthetic without torchvision); synthetic: random tensors",
    )
    parser.add_argument("--dataset-size", type=int, default=256)
    parser.add_argument(
        "--fixed-batch",
        action="store_true",
        help="train on the first batch (and mask) over and over: the loss must go down",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = "eva02_tiny_patch14_224_mim" if args.mim else "vit_small_patch16_224"
    if args.layer_decay is None:
        args.layer_decay = 1.0 if args.mim else 0.75
    if args.bf16 is None:
        args.bf16 = torch.device(args.device).type == "cuda"
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        parser.error("--steps, --batch-size and --log-every must be >= 1")
    return args


def build_dataset(args: argparse.Namespace) -> torch.utils.data.Dataset:
    size = max(args.dataset_size, args.batch_size)
    if args.data == "fake":
        try:
            from torchvision import datasets, transforms
        except ImportError:
            print("torchvision is not installed: using a synthetic TensorDataset", file=sys.stderr)
        else:
            transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
            return datasets.FakeData(
                size, (3, args.img_size, args.img_size), args.num_classes, transform, random_offset=args.seed
            )
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(args.num_classes, (size,), generator=generator)
    return TensorDataset(images, labels)


def batches(loader: DataLoader, fixed: bool):
    """Endless batches: the first one over and over with ``fixed``, else epoch after epoch."""
    if fixed:
        batch = next(iter(loader))
        while True:
            yield batch
    while True:
        yield from loader


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    if not args.mim:
        model = vitfast.create_model(args.model, depth=args.depth, img_size=args.img_size, num_classes=args.num_classes)
        return model.to(device).train(), None
    model = vitfast.create_model(args.model, depth=args.depth, img_size=args.img_size)
    if model.lm_head is None:
        raise SystemExit(f"--mim needs a model with a MIM head (an eva02_*_mim model), not {args.model!r}.")
    # EVA-CLIP-like frozen teacher: same patch grid, per-patch features of the student's lm_head width
    teacher = vitfast.create_model(
        "vit_small_patch16_224",
        patch_size=model.patch_embed.patch_size[0],
        img_size=args.img_size,
        depth=args.depth,
        num_classes=model.lm_head.out_features,
    )
    teacher.requires_grad_(False)
    return model.to(device).train(), teacher.to(device).eval()


@torch.no_grad()
def teacher_patch_features(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """EVA-CLIP's ``encode_image`` as EVA-02 reads it: final LayerNorm, class token dropped, linear head per patch."""
    tokens = teacher.forward_features(images)[:, teacher.num_prefix_tokens :]
    return teacher.head(tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, teacher = build_models(args, device)
    loader = DataLoader(
        build_dataset(args),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    masks = (
        BlockMaskGenerator(
            model.patch_embed.grid_size,
            args.mask_ratio,
            args.min_block,
            generator=torch.Generator().manual_seed(args.seed),
        )
        if args.mim
        else None
    )
    groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98) if args.mim else (0.9, 0.999))
    scheduler = cosine_lr_schedule(optimizer, args.steps, args.warmup_steps, args.min_lr_ratio)
    head_group = max(optimizer.param_groups, key=lambda group: group["layer_id"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    print(
        f"{'MIM pretraining' if args.mim else 'fine-tuning'} {args.model} (depth {args.depth}, {args.img_size}px) "
        f"on {device}{' with bf16 autocast' if args.bf16 else ''}: {len(groups)} parameter groups, "
        f"layer decay {args.layer_decay}",
        flush=True,
    )

    data = batches(loader, args.fixed_batch)
    fixed_mask = None
    progress = tqdm(total=args.steps, disable=args.no_progress) if tqdm is not None else None
    write = progress.write if progress is not None else print
    losses = []
    for step in range(1, args.steps + 1):
        images, labels = (tensor.to(device, non_blocking=True) for tensor in next(data))
        with autocast:
            if args.mim:
                mask = fixed_mask if fixed_mask is not None else masks(images.shape[0], device=device)
                if args.fixed_batch:
                    fixed_mask = mask
                loss = eva02_mim_loss(model.forward_mim(images, mask), teacher_patch_features(teacher, images), mask)
            else:
                loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        lr = head_group["lr"]  # the lr this step ran at; the scheduler moves it on below
        optimizer.step()
        scheduler.step()

        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            write(f"step {step}/{args.steps} loss {value} lr {lr:.3e}: not finite, stopping")
            return 1
        if step % args.log_every == 0 or step == args.steps:
            write(f"step {step}/{args.steps} loss {value:.6f} lr {lr:.3e}")
        if progress is not None:
            progress.set_postfix(loss=f"{value:.4f}")
            progress.update()
    if progress is not None:
        progress.close()
    print(f"done: {args.steps} steps, first loss {losses[0]:.6f}, last loss {losses[-1]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
