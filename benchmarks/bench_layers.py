"""Speed and memory of the GSA-Net layers against a straightforward implementation of the same maths.

Prints, for the RotMNIST R4 net (paper form and aligned form) and for a straightforward
implementation written here (unfold plus one broadcast einsum over all indices, the positional
MLP evaluated every forward, attention computed at every position and then cropped, as the
paper's public code does): training images/s (forward + backward + Adam step) at batch 8 and 64,
inference images/s at batch 64, and peak memory; outputs of all three compared first. "ours" is
the fused CPU kernel (training/fused_attention.py); "ours-paper-chunked" the paper form on the chunked
kernel that GPUs run (``GSA_FUSED_ATTENTION=0``). Then one training step at the paper's batch size
for every configuration of the paper (time, peak memory).

Every measurement runs in a fresh subprocess; peak memory is the process's peak resident set
(``VmHWM``, reset just before the timed steps) above its resident set after one warm-up step at
batch 1 (model, optimizer and inputs built, one-time library initialisation done). Not
``ru_maxrss``: Linux carries it over fork and exec, so every child's peak started at the parent's
resident set (about 500 MB here); earlier figures showed that as a fixed ~300 MB.

``--allocator fixed`` runs the subprocesses with glibc's mmap threshold fixed (``ALLOCATOR_ENV``).
By default the threshold grows after the first large free and freed chunks of a few MB stay
resident, so the resident set holds the allocator's cache as well as live tensors. Fixed, our
peak is about half (R4 training step at batch 8: 162 against 367 MB), but every chunk is then a
fresh mapping and our steps run about 3x slower; the default (``--allocator default``) is what
users get. Ratios are meaningful within one run on one machine; absolute figures drift with load,
and load slows the memory-bound straightforward version more than ours.

    python benchmarks/bench_layers.py                  # everything (tens of minutes on 2 cores)
    python benchmarks/bench_layers.py --part compare   # R4 net vs straightforward only
    python benchmarks/bench_layers.py --part pairs --rounds 5   # the batch-8 ratios, alternated, median
    python benchmarks/bench_layers.py --part configs --configs gsa_pcam_r8 gsa_cifar10_r4m
    python benchmarks/bench_layers.py --part memory --allocator fixed --configs gsa_rotmnist_r4 gsa_pcam_r4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from procmem import peak_mb, reset_peak, rss_mb  # benchmarks/procmem.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Paper configurations: RotMNIST with every group; CIFAR-10 and PCam with the groups the paper
# trained them with (plus R8 on PCam, the case whose scores no longer fit straightforwardly).
PAPER_CONFIGS = [f"gsa_rotmnist_{g}" for g in ("z2", "z2m", "r4", "r8", "r12", "r16", "r4m")] + [
    "gsa_cifar10_z2", "gsa_cifar10_z2m", "gsa_cifar10_r4", "gsa_cifar10_r4m",
    "gsa_pcam_z2", "gsa_pcam_z2m", "gsa_pcam_r4", "gsa_pcam_r4m", "gsa_pcam_r8",
]
PAPER_BATCH = {"rotmnist": 8, "cifar10": 24, "pcam": 16}


ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}


# ---- the straightforward implementation --------------------------------------------------------
def naive_attention_forward(layer, x, lifting: bool):
    """Same maths as the layer, written the direct way: all positions, unfold, one einsum."""
    import torch
    import torch.nn.functional as F

    if lifting:
        x = x.unsqueeze(3)  # B, H, W, 1, C
    b, h, w, gin, _ = x.shape
    nh, d, k = layer.num_heads, layer.head_dim, layer.kernel_size
    g, pad = layer.group.order, layer.kernel_size // 2
    q = layer.query(x) * layer.scale  # B, H, W, Gin, nh d
    kk, vv = layer.key(x), layer.value(x)  # B, H, W, Gin, nh d

    def unfold(t):  # B, H, W, Gin, nh d -> B, nh, H W, k k, Gin, d
        t = t.permute(0, 3, 4, 1, 2).reshape(b, gin * nh * d, h, w)
        t = F.unfold(t, k, padding=pad).view(b, gin, nh, d, k * k, h * w)
        return t.permute(0, 2, 5, 4, 1, 3)

    kw, vw = unfold(kk), unfold(vv)
    q = q.view(b, h * w, gin, nh, d).permute(0, 3, 1, 2, 4)  # B, nh, HW, Gin, d
    inside = F.unfold(torch.ones(1, 1, h, w), k, padding=pad).view(k * k, h * w).t() > 0  # HW, P
    table = layer.pos_enc()  # evaluated every forward: lifting [G, P, d], group [G, P, G', d]
    if layer.window != "square" or table.shape[1] != k * k:
        raise ValueError("the straightforward version covers square windows only")
    if lifting:
        s = torch.einsum("bnxd,bnxpd->bnxp", q[:, :, :, 0], kw[..., 0, :])[:, :, :, None]
        s = s + torch.einsum("bnxd,hpd->bnxhp", q[:, :, :, 0], table)  # B, nh, HW, G, P
        s = s.masked_fill(~inside[None, None, :, None], float("-inf")).softmax(-1)
        out = torch.einsum("bnxhp,bnxpd->bnxhd", s, vw[..., 0, :])
    else:
        # scores over (query orientation t, output h, offset p, key orientation k)
        s = torch.einsum("bnxtd,bnxpkd->bnxtpk", q, kw)[:, :, :, :, None]
        s = s + torch.einsum("bnxtd,hpkd->bnxthpk", q, table)  # B, nh, HW, G~, G, P, G'
        shape = s.shape
        s = s.masked_fill(~inside[None, None, :, None, None, :, None], float("-inf"))
        s = s.flatten(-2).softmax(-1).view(shape)
        if layer.form == "paper":
            out = torch.einsum("bnxthpk,bnxpkd->bnxhd", s, vw)
        else:
            out = torch.einsum("bnxhhpk,bnxpkd->bnxhd", s, vw)
    out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, g, nh * d)
    c = layer.crop
    out = out[:, c : h - c, c : w - c]
    return layer.proj(out)


def make_naive(model):
    """Swap every attention layer's forward for the straightforward one (same weights)."""
    from training.lifting import LiftingSelfAttention

    for layer in model.attention_layers():
        lifting = isinstance(layer, LiftingSelfAttention)
        layer.forward = (lambda lyr, lf: (lambda x: naive_attention_forward(lyr, x, lf)))(layer, lifting)
    return model


# ---- one measurement, in a subprocess -------------------------------------------------------
def make_step(model, opt, mode: str):
    """``step(images, labels)``: a training step (forward, backward, optimizer) or a forward pass."""
    import torch

    def step(images, labels) -> None:
        if mode == "train":
            model.train()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                model(images)

    return step


def measure(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    from training.networks import create_model

    model = create_model(spec["model"], **spec.get("overrides", {}))
    if spec.get("impl") == "naive":
        make_naive(model)
    cfg = model.config
    bs = spec["batch"]
    x = torch.rand(bs, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (bs,))
    if spec["mode"] == "phases":
        return measure_phases(model, x, y)
    step = make_step(model, torch.optim.Adam(model.parameters(), 1e-3), spec["mode"])
    step(x[:1], y[:1])  # one-time initialisation (kernels, thread pools, caches) outside the peak
    base = rss_mb()
    reset_peak()
    times = []
    for _ in range(spec["warmup"] + spec["repeats"]):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    best = min(times[spec["warmup"]:])
    return {"images_per_s": bs / best, "seconds": best, "peak_mb": peak_mb() - base}


def measure_phases(model, x, y) -> dict:
    """What a training step holds between its forward and backward passes (``kept_mb``: the
    resident set after the forward pass, the loss and its graph alive) and the peaks of each pass,
    all above the warmed-up process. Meant for ``--allocator fixed``, where the resident set is the
    live memory."""
    import torch

    def forward(images, labels):
        return torch.nn.functional.cross_entropy(model(images), labels)

    model.train()
    forward(x[:1], y[:1]).backward()  # one-time initialisation outside the peaks
    model.zero_grad(set_to_none=True)
    base = rss_mb()
    reset_peak()
    loss = forward(x, y)
    kept, forward_peak = rss_mb() - base, peak_mb() - base
    reset_peak()
    loss.backward()
    return {"kept_mb": kept, "forward_peak_mb": forward_peak, "backward_peak_mb": peak_mb() - base}


def part_memory(names: list[str], timeout: float, allocator: str) -> None:
    print(f"\nmemory of one training step at the paper's batch size, by phase (allocator {allocator})")
    for name in names:
        batch = PAPER_BATCH[name.split("_")[1]]
        res = run_sub({"model": name, "mode": "phases", "batch": batch}, timeout, allocator)
        if "error" in res:
            print(f"{name:<16} b{batch:<3} {res['error']}")
            continue
        print(f"{name:<16} b{batch:<3} kept for backward +{res['kept_mb']:7.0f} MB, forward peak "
              f"+{res['forward_peak_mb']:7.0f} MB, backward peak +{res['backward_peak_mb']:7.0f} MB", flush=True)


def run_sub(spec: dict, timeout: float, allocator: str = "default") -> dict:
    cmd = [sys.executable, __file__, "--measure", json.dumps(spec)]
    env = {**os.environ, **(ALLOCATOR_ENV if allocator == "fixed" else {}),
           "GSA_FUSED_ATTENTION": "0" if spec.get("kernel") == "chunked" else "1"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_outputs() -> None:
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    for form in ("paper", "aligned"):
        ours = create_model("gsa_rotmnist_r4", form=form).eval()
        naive = make_naive(create_model("gsa_rotmnist_r4", form=form).eval())
        naive.load_state_dict(ours.state_dict())
        with torch.no_grad():
            a, b = ours(x), naive(x)
        err = float((a - b).abs().max() / b.abs().max())
        print(f"outputs, {form} form vs straightforward: max relative difference {err:.2e}"
              f" ({'ok' if err < 1e-5 else 'MISMATCH'})")
        if err >= 1e-5:
            raise SystemExit("outputs differ by more than 1e-5")


def part_compare(timeout: float, allocator: str, naive_train_b64: bool = True) -> None:
    compare_outputs()
    rows = []
    for impl, form, kernel in (("ours", "paper", "fused"), ("ours", "aligned", "fused"),
                               ("ours", "paper", "chunked"), ("naive", "paper", "fused")):
        for mode, batch in (("train", 8), ("train", 64), ("infer", 8), ("infer", 64)):
            if impl == "naive" and batch == 64 and mode == "train" and not naive_train_b64:
                continue  # its autograd graph peaked at 17.5 GB here (scores about 2 GB each)
            spec = {"model": "gsa_rotmnist_r4", "overrides": {"form": form}, "impl": impl, "mode": mode,
                    "batch": batch, "warmup": 1, "repeats": 2 if impl == "ours" else 1, "kernel": kernel}
            res = run_sub(spec, timeout, allocator)
            rows.append((f"{impl}-{form}" + ("-chunked" if kernel == "chunked" else ""), mode, batch, res))
            print(_fmt_row(*rows[-1]), flush=True)
    base = {(m, b): r for name, m, b, r in rows if name == "naive-paper" and "error" not in r}
    for name, m, b, r in rows:
        if name.startswith("ours") and (m, b) in base and "error" not in r:
            nb = base[(m, b)]
            print(f"  {name} {m} b{b}: {r['images_per_s'] / nb['images_per_s']:.1f}x faster, "
                  f"{nb['peak_mb'] / max(r['peak_mb'], 1.0):.1f}x less peak memory than straightforward")


def part_pairs(rounds: int, timeout: float, allocator: str) -> None:
    """Paper form against the straightforward version at batch 8, alternated ``rounds`` times
    (ours on the fused kernel, ours on the chunked kernel, then straightforward, for training and
    for inference): each round's ratios and their median, so that the load drifting between runs
    moves both sides of a ratio alike."""
    import statistics

    print(f"\nalternated pairs at batch 8, paper form, {rounds} rounds")
    ratios: dict[str, list[tuple[float, float]]] = {"train": [], "infer": []}
    fused_over_chunked: dict[str, list[float]] = {"train": [], "infer": []}
    for i in range(rounds):
        for mode in ("train", "infer"):
            res = {}
            for impl, kernel in (("ours", "fused"), ("chunked", "chunked"), ("naive", "fused")):
                spec = {"model": "gsa_rotmnist_r4", "overrides": {"form": "paper"}, "mode": mode, "batch": 8,
                        "impl": "naive" if impl == "naive" else "ours", "kernel": kernel, "warmup": 1,
                        "repeats": 1 if impl == "naive" else 2}
                res[impl] = run_sub(spec, timeout, allocator)
            if any("error" in r for r in res.values()):
                print(f"round {i + 1} {mode}: {res}")
                continue
            speed = res["ours"]["images_per_s"] / res["naive"]["images_per_s"]
            memory = res["naive"]["peak_mb"] / max(res["ours"]["peak_mb"], 1.0)
            ratios[mode].append((speed, memory))
            fused_over_chunked[mode].append(res["ours"]["images_per_s"] / res["chunked"]["images_per_s"])
            print(f"round {i + 1} {mode} b8: ours {res['ours']['images_per_s']:.2f} (chunked kernel "
                  f"{res['chunked']['images_per_s']:.2f}) vs {res['naive']['images_per_s']:.2f} images/s ({speed:.1f}x), "
                  f"{res['ours']['peak_mb']:.0f} ({res['chunked']['peak_mb']:.0f}) vs {res['naive']['peak_mb']:.0f} MB "
                  f"({memory:.1f}x less)", flush=True)
    for mode, values in ratios.items():
        if values:
            print(f"  median over {len(values)} rounds, {mode} b8: {statistics.median(v[0] for v in values):.1f}x faster, "
                  f"{statistics.median(v[1] for v in values):.1f}x less peak memory; fused kernel "
                  f"{statistics.median(fused_over_chunked[mode]):.2f}x the chunked kernel's speed")


def _fmt_row(name, mode, batch, res) -> str:
    if "error" in res:
        return f"{name:<18} {mode:<5} b{batch:<3} {res['error']}"
    return (f"{name:<18} {mode:<5} b{batch:<3} {res['images_per_s']:8.2f} images/s "
            f"{res['seconds']:8.2f} s/step  peak +{res['peak_mb']:8.0f} MB")


def part_configs(names: list[str], timeout: float, allocator: str) -> None:
    print(f"\none training step at the paper's batch size (timeout {timeout:.0f} s each)")
    for name in names:
        batch = PAPER_BATCH[name.split("_")[1]]
        spec = {"model": name, "mode": "train", "batch": batch, "warmup": 0, "repeats": 1}
        print(_fmt_row(name, "train", batch, run_sub(spec, timeout, allocator)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "compare", "configs", "pairs", "memory"], default="all")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --part pairs")
    parser.add_argument("--configs", nargs="*", default=PAPER_CONFIGS)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--allocator", choices=["fixed", "default"], default="default",
                        help="glibc mmap threshold fixed (ALLOCATOR_ENV) or left dynamic")
    parser.add_argument("--no-naive-train-b64", dest="naive_train_b64", action="store_false",
                        help="skip the straightforward version's training step at batch 64 (17.5 GB peak here)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}, allocator {args.allocator}")
    if args.part in ("all", "compare"):
        part_compare(args.timeout, args.allocator, args.naive_train_b64)
    if args.part in ("all", "configs"):
        part_configs(args.configs, args.timeout, args.allocator)
    if args.part == "pairs":
        part_pairs(args.rounds, args.timeout, args.allocator)
    if args.part == "memory":
        part_memory(args.configs, args.timeout, args.allocator)


if __name__ == "__main__":
    main()
