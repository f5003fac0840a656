"""Images per second of both classification recipes: one training step and inference, on random crops.

Why random crops: speed depends on shapes, not on pixel values, and the benchmark must run anywhere without a
dataset. One "image" is one slice crop (C channels x S x S); a sequence-model study is 7 vertebrae x K images.

Usage::

    .venv/bin/python benchmarks/bench_cls.py                       # CPU sizes used for the 60-study benchmark
    .venv/bin/python benchmarks/bench_cls.py --device cuda --threads 8 --slices 24 --size 384 \
        --seq-encoder efficientnet-b0 --seq-width 1 --batch 2 --seed-size 384 --seed-batch 64   # winners' sizes
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cspine.cls.config import CropConfig, ModelConfig
from cspine.cls.models import SeedNet, create_model
from cspine.cls.recipes import sequence_loss
from cspine.features.linear import LucencyModel
from cspine.features.lucency import N_LUCENCY


def _timeit(fn, steps: int, warmup: int, sync) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of one call after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_sequence(args: argparse.Namespace, device: torch.device, sync) -> dict[str, float]:  # type: ignore[no-untyped-def]
    crop = CropConfig(slices=args.slices, size=args.size)
    model = create_model(
        "sequence", ModelConfig(encoder=args.seq_encoder, width=args.seq_width, stem_stride=args.seq_stem_stride), crop
    ).to(device)
    b = args.batch
    images = torch.randint(
        0, 255, (b, 7, crop.slices, crop.channels, crop.size, crop.size), dtype=torch.uint8, device=device
    )
    present = torch.ones(b, 7, dtype=torch.bool, device=device)
    stats = torch.rand(b, 7, N_LUCENCY, device=device)
    # the fitted lucency regression's logits, added in one step as the recipe does (cspine.features.linear)
    lucency = LucencyModel.fit(stats.cpu(), present.cpu(), (torch.rand(b, 7) < 0.3).numpy())
    offset = lucency.logits(stats, present)
    batch = {
        "labels": torch.zeros(b, 8, device=device),
        "present": present,
        "slice_labels": torch.zeros(b, 7, crop.slices, device=device),
        "slice_valid": torch.ones(b, 7, crop.slices, dtype=torch.bool, device=device),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = device.type == "cuda"

    def train_step() -> None:
        model.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = sequence_loss(model(images, present, offset=offset), batch, 0.3, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            model(images, present, offset=lucency.logits(stats, present))

    n = b * 7 * crop.slices
    return {
        "train_images_per_s": n / _timeit(train_step, args.steps, 1, sync),
        "infer_images_per_s": n / _timeit(infer, args.steps, 1, sync),
    }


def bench_seed(args: argparse.Namespace, device: torch.device, sync) -> dict[str, float]:  # type: ignore[no-untyped-def]
    crop = CropConfig(slices=args.slices, size=args.seed_size)
    net = SeedNet(ModelConfig(encoder="resnet50"), crop).to(device)  # one of the seven per-vertebra nets
    n = args.seed_batch
    images = torch.randint(0, 255, (n, crop.channels, crop.size, crop.size), dtype=torch.uint8, device=device)
    labels = torch.zeros(n, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    amp = device.type == "cuda"

    def train_step() -> None:
        net.train()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(images).float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer() -> None:
        net.eval()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            net(images)

    return {
        "train_images_per_s": n / _timeit(train_step, args.steps, 1, sync),
        "infer_images_per_s": n / _timeit(infer, args.steps, 1, sync),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="1 on a shared 2-core machine: 2 threads oversubscribe")
    p.add_argument("--slices", type=int, default=10, help="K")
    p.add_argument("--size", type=int, default=48, help="S of the sequence model")
    p.add_argument("--seq-encoder", default="resnet10")
    p.add_argument("--seq-width", type=float, default=0.5)
    p.add_argument("--seq-stem-stride", type=int, default=2, choices=(1, 2), help="1 = the recipe's GPU default")
    p.add_argument("--batch", type=int, default=2, help="studies per sequence batch")
    p.add_argument("--seed-size", type=int, default=48, help="S of the seed baseline")
    p.add_argument("--seed-batch", type=int, default=32, help="images per seed batch")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seq_name = f"sequence ({args.seq_encoder} x{args.seq_width}/{args.seq_stem_stride}, K={args.slices}, S={args.size})"
    results = {
        seq_name: bench_sequence(args, device, sync),
        f"seed-baseline (resnet50, S={args.seed_size})": bench_seed(args, device, sync),
    }
    print(f"device {device}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'recipe':55s} {'train img/s':>12s} {'infer img/s':>12s}")
    for name, r in results.items():
        print(f"{name:55s} {r['train_images_per_s']:12.1f} {r['infer_images_per_s']:12.1f}")
    print(json.dumps({k: {m: round(v, 1) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
