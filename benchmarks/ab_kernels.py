"""A/B of the attention kernel against an earlier commit's, on the RotMNIST R4 net (paper form).

Loads ``training/attention_kernels.py`` as it was at REV (``git show``) beside the working tree's,
with REV's fused CPU kernel (``training/fused_attention.py`` and its C++ source) where REV has one
(the layers' own code stays the working tree's), and alternates them step by step in one process,
on the same weights (SGD with lr 0, so every step sees the same model), so that drift of a shared
machine hits both alike. Prints images/s of each (best of the steps after the first) for a training
step at batch 8 and inference at batch 64.

    python benchmarks/ab_kernels.py 1f8b654 [--steps 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import training.attention_base as base  # noqa: E402
from bench_layers import make_step  # noqa: E402
import training.attention_kernels as current  # noqa: E402
from training.networks import create_model  # noqa: E402


def git_show(rev: str, path: str) -> str | None:
    """``path`` as it was at ``rev``, or ``None`` where it did not exist."""
    result = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def load_module(name: str, path: Path, source: str):
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_revision(rev: str, folder: Path):
    """REV's kernel module; where REV has a fused kernel, bound to REV's (its interface changed
    with the kernels', so the working tree's would not fit)."""
    source = git_show(rev, "training/attention_kernels.py")
    if source is None:
        raise SystemExit(f"{rev} has no training/attention_kernels.py")
    module = load_module("attention_kernels_at_rev", folder / "attention_kernels_at_rev.py", source)
    fused_source = git_show(rev, "training/fused_attention.py")
    cpp = git_show(rev, "training/csrc/window_attention.cpp")
    if hasattr(module, "fused_attention") and fused_source is not None and cpp is not None:
        (folder / "csrc").mkdir(exist_ok=True)
        (folder / "csrc" / "window_attention.cpp").write_text(cpp)  # where its SOURCE points
        module.fused_attention = load_module("fused_attention_at_rev", folder / "fused_attention_at_rev.py",
                                             fused_source)
    return module


def layer_entry(module):
    """What the layers call, ``projected_window_attention(x, params, project, table, plan)``, from a
    kernel module. Revisions before the plan (``training.attention_plan.AttentionPlan``) take its
    fields positionally; revisions before ``projected_window_attention`` (before 7f7b6e6) get their
    ``window_attention`` on q, k, v projected here, which is what the layers of those revisions did
    (q, k, v then kept for the backward pass)."""
    entry = getattr(module, "projected_window_attention", None)
    if entry is not None and "plan" in inspect.signature(entry).parameters:
        return entry

    def unpacked(x, params, project, table, plan):
        fields = (plan.index, plan.bias, list(plan.row_outside), plan.chunk, plan.p_drop)
        if entry is not None:
            return entry(plan.form, x, params, project, table, *fields)
        return module.window_attention(plan.form, *project(x, *params), table, *fields)

    return unpacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="git revision of the kernel to compare against")
    parser.add_argument("--steps", type=int, default=4, help="steps of each kernel (the first is a warm-up)")
    args = parser.parse_args()
    if not hasattr(base, "projected_window_attention"):  # else patching it below would change nothing
        raise SystemExit("training.attention_base no longer calls projected_window_attention; update this script")
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {args.rev: load_revision(args.rev, Path(tmp)), "working tree": current}
        torch.manual_seed(0)
        for mode, batch in (("train", 8), ("infer", 64)):
            model = create_model("gsa_rotmnist_r4")
            x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            step = make_step(model, torch.optim.SGD(model.parameters(), lr=0.0), mode)

            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.steps):
                for name, module in kernels.items():
                    base.projected_window_attention = layer_entry(module)
                    start = time.perf_counter()
                    step(x, y)
                    times[name].append(time.perf_counter() - start)
            best = {name: min(t[1:]) for name, t in times.items()}
            rates = ", ".join(f"{name} {batch / best[name]:.2f} images/s" for name in kernels)
            print(f"{mode} b{batch}: {rates}; working tree / {args.rev} = "
                  f"{best[args.rev] / best['working tree']:.2f}x (best of {args.steps - 1})", flush=True)
        base.projected_window_attention = current.projected_window_attention


if __name__ == "__main__":
    main()
