"""Training-step throughput of registered nets on the available device (CUDA when present).

For each ``name:batch:log2_chunk`` spec: the net with ``chunk_elements = 2**log2_chunk`` and the
paper's dropout (0.1), Adam, one fixed random batch of the net's input size; 3 warm-up
steps, then ``--steps`` timed steps (forward, cross-entropy, backward, optimizer step), synchronised
on CUDA. Prints images/s and, on CUDA, the peak allocated memory. No data loading, augmentation or
weight averaging: the trainer's own figures (``images_per_s`` in ``metrics.jsonl``) include those.
Launch several at once to see how runs share one GPU.

    python benchmarks/bench_train_step.py --steps 8 gsa_rotmnist_r4:64:24 gsa_rotmnist_r4:64:27
"""

from __future__ import annotations

import argparse
import time

import torch

from training.networks import create_model


def measure(name: str, batch: int, log2_chunk: int, steps: int, device: torch.device) -> tuple[float, float]:
    """``(images/s, peak MB)`` of ``steps`` training steps; peak MB is 0 off CUDA."""
    torch.manual_seed(0)
    model = create_model(name, chunk_elements=1 << log2_chunk, attn_drop=0.1, value_drop=0.1).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = model.config
    x = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    cuda = device.type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return steps * batch / seconds, torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="name:batch:log2_chunk, e.g. gsa_rotmnist_r4:64:27")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per spec")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for spec in args.specs:
        try:
            name, batch, log2_chunk = spec.split(":")
            batch_size, chunk = int(batch), int(log2_chunk)
        except ValueError:
            parser.error(f"spec {spec!r}: expected name:batch:log2_chunk, e.g. gsa_rotmnist_r4:64:27")
        rate, peak = measure(name, batch_size, chunk, args.steps, device)
        print(f"{spec:32s} {rate:9.1f} images/s  peak {peak:8.0f} MB", flush=True)


if __name__ == "__main__":
    main()
