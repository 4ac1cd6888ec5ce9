"""The fused CPU attention kernel (``training/csrc/window_attention.cpp``), built on first use.

The chunked kernel of :mod:`training.attention_kernels` runs a few dozen ATen operations per chunk,
each over a chunk-sized buffer of scores: on a CPU most of a training step went to their memory
traffic and per-call overhead (tiny batched GEMMs with head dim 10), not to arithmetic. The fused
kernel computes one query position at a time (gather its window, scores, softmax, dropout, sum
over query orientations, the value product, and backward the same again) in a few KB per thread,
so it also needs no chunking. The maths is the chunked kernel's; tests compare the two.

It is compiled with :func:`torch.utils.cpp_extension.load` (needs a C++ compiler with OpenMP, and
ninja, which the ``train`` extra installs) into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``) the first time a CPU layer runs: about 25 s on this
project's 2-core machine, then loaded from the cache; one build per CPU capability and version of
the source (older builds stay in the cache until removed). ``GSA_FUSED_ATTENTION`` chooses:
``auto`` (default: use it when it builds, else warn once and use the chunked kernel), ``1`` (must
build, else raise), ``0`` (never). GPUs, graph capture (ONNX export, ``torch.compile``) and dtypes
other than float32/float64 use the chunked kernel.

The kernel's memory layouts are known here only: it reads keys and values as ``[B, nh, d, N G']``
(:func:`padded_keys` lays the layers' out so, in the copy that pads them anyway) and writes its
output over ``[B, X, G, nh, d]`` memory, so that merging the heads after it is a view.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from training.attention_plan import AttentionPlan

__all__ = ["load", "usable", "forward", "backward", "padded_keys", "MODES"]

MODES = ("auto", "1", "0")
SOURCE = Path(__file__).resolve().parent / "csrc" / "window_attention.cpp"

_lock = threading.Lock()
_state: dict[str, object] = {}


def _mode() -> str:
    mode = os.environ.get("GSA_FUSED_ATTENTION", "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"GSA_FUSED_ATTENTION must be one of {MODES}, got {mode!r}")
    return mode


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary sits in the environment's bin/,
    which is not on PATH when the environment is not activated (``.venv/bin/python ...``)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


def _isa_flags(capability: str) -> list[str]:
    """Instruction sets from torch's CPU capability, not ``-march=native``: the build is cached
    under a name carrying the capability, and a cache shared by two CPUs of the same capability
    (a home directory on NFS) must not hold instructions only one of them has."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if capability == "AVX512":  # torch's AVX512 needs F, BW, VL and DQ
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mtune=native"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mtune=native"]
    return []


def load():
    """The compiled extension, building it on the first call; ``None`` when disabled or (mode
    ``auto``) when the build fails."""
    mode = _mode()
    if mode == "0":
        return None
    with _lock:
        if "module" not in _state:
            try:
                from torch.utils.cpp_extension import load as load_extension

                _put_ninja_on_path()

                capability = torch.backends.cpu.get_cpu_capability()
                # builds for other CPUs and other versions of the source (another checkout sharing
                # the cache) live apart instead of rebuilding over each other
                source_hash = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
                tag = f"{platform.machine()}_{capability}_{source_hash}".lower()
                _state["module"] = load_extension(
                    name=f"gsa_window_attention_{tag}",
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", *_isa_flags(capability)],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as error:  # noqa: BLE001 - any build failure falls back (or raises in mode 1)
                _state["module"] = None
                _state["error"] = error
                if mode == "auto":
                    warnings.warn(f"fused CPU attention kernel unavailable ({error}); using the chunked kernel",
                                  RuntimeWarning, stacklevel=2)
        if _state["module"] is None and mode == "1":
            raise RuntimeError(f"GSA_FUSED_ATTENTION=1 but the fused kernel did not build: {_state.get('error')}")
        return _state["module"]


def usable(q: torch.Tensor) -> bool:
    """Whether a layer call on ``q`` runs the fused kernel."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return load() is not None


def _bias(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if bias is None else bias.to(like.dtype).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def padded_keys(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Keys or values zero-padded by ``pad`` on every side, laid out in memory as the kernel reads
    them, ``[B, nh, d, Hp Wp, G]`` (any other layout costs the kernel a copy).

    Args:
        t: ``[B, H, W, G, nh, d]``.
        pad: rows and columns of zeros added on every side.

    Returns:
        ``[B, nh, Hp Wp, G, d]`` (a permuted view).
    """
    b, _, _, g, nh, d = t.shape
    t = t.permute(0, 4, 5, 1, 2, 3)  # B, nh, d, H, W, G: padded and laid out in one copy
    t = (F.pad(t, (0, 0, pad, pad, pad, pad)) if pad else t).contiguous()  # B, nh, d, Hp, Wp, G
    return t.view(b, nh, d, -1, g).permute(0, 1, 3, 4, 2)  # B, nh, Hp Wp, G, d


def forward(q, k, v, table, plan: AttentionPlan, seed: int) -> torch.Tensor:
    """``[B, nh, X, G, d]``, the chunked kernel's output (same arguments, one dropout seed for the
    whole layer, no chunks), laid out in memory as ``[B, X, G, nh, d]``. ``q`` (and backward
    ``dout``) may be any view whose head dim is contiguous, such as the layers' permuted projections."""
    return load().forward(_rows(q), k, v, table.contiguous(), plan.index.contiguous(),
                          _bias(plan.bias, q), plan.form == "paper", float(plan.p_drop), int(seed))


def backward(q, k, v, table, plan: AttentionPlan, seed: int, dout):
    """``(dq, dk, dv, dtable)`` for ``dout``; the dropout masks of :func:`forward` with ``seed``."""
    dq, dk, dv, dtable = load().backward(_rows(q), k, v, table.contiguous(),
                                         plan.index.contiguous(), _bias(plan.bias, q), plan.form == "paper",
                                         float(plan.p_drop), int(seed), _rows(dout))
    return dq, dk, dv, dtable
