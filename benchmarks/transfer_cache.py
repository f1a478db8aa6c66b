"""What the feature cache buys a transfer fit, side by side in one run, same model, size and threads:

(a) one epoch of the head alone on cached backbone features (what `train.freeze_backbone` trains);
(b) one epoch of fine-tuning end to end (forward and backward through the whole network), timed on
    a few batches and scaled to the same number of images;
(c) the one-off cost of the cache: the backbone's forward pass over the same images.

Prints a, b and c in seconds per epoch of N images, b/a (the speed-up of an epoch) and (c + E*a)
against E*b for an E-epoch fit. The CPU's AVX-512 flags are printed beside the times.

    python benchmarks/transfer_cache.py [--model efficientnet-lite0 --image-size 224 --images 5000 --epochs 30]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from defungi.models import create_model, model_entry
from defungi.utils import cpu_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=5000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed batches for (b) and (c)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=5).to(memory_format=torch.channels_last)
    head = model.get_submodule(model_entry(args.model).parts.classifier)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (args.batch_size,))
    criterion = nn.CrossEntropyLoss()
    batches = args.images / args.batch_size

    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            model(x)
    cache = (time.perf_counter() - start) / args.steps * batches

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(net: nn.Module, inputs: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        loss = criterion(net(inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(model, x, optimizer)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step(model, x, optimizer)
    finetune = (time.perf_counter() - start) / args.steps * batches

    features = torch.randn(args.batch_size, head.in_features)
    head_optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    start, n = time.perf_counter(), 0
    while n < batches:
        step(head, features, head_optimizer)
        n += 1
    head_epoch = time.perf_counter() - start

    threads = torch.get_num_threads()
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {threads} threads; CPU: {cpu_flags()}")
    print(f"(a) head epoch on cached features: {head_epoch:.2f} s per {args.images} images")
    print(f"(b) fine-tuning epoch end to end:  {finetune:.0f} s per {args.images} images")
    print(f"(c) features, computed once:       {cache:.0f} s for {args.images} images")
    print(f"b/a, one epoch: {finetune / head_epoch:.0f}x")
    e = args.epochs
    print(f"{e}-epoch fit: cache + heads {cache + e * head_epoch:.0f} s against fine-tuning {e * finetune:.0f} s: "
          f"{e * finetune / (cache + e * head_epoch):.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
