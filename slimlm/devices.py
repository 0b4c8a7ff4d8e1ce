"""Where a model runs and in what precision: one parser for ``--device`` / ``--dtype`` and the timers' sync.

Every command that loads a model (``eval``, ``compress``, ``generate`` …) adds the same two options
with :func:`add_device_args`; the Python API takes the same strings (or torch objects). The default
is the CPU in float32 (the measured configuration); ``--device auto`` picks CUDA when it is present.
"""

from __future__ import annotations

import argparse
import time

import torch

from slimlm.errors import SlimlmError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_HELP = "cpu (default) | cuda | cuda:N | mps | auto (CUDA when present, else CPU)"


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` with the shared defaults and help."""
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of the loaded model")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A usable torch device, or one line saying why the requested one is not available."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SlimlmError(f"--device {device!r} is not a device", DEVICE_HELP) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimlmError(f"--device {device}: CUDA is not available on this machine", "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SlimlmError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present",
                              f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SlimlmError(f"--device {device}: MPS is not available on this machine", "use --device cpu (or auto)")
    elif dev.type not in {"cpu", "cuda", "mps"}:
        raise SlimlmError(f"--device {device!r} is not supported", DEVICE_HELP)
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``float32`` (default), ``float16`` or ``bfloat16`` as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise SlimlmError(f"dtype {dtype} is not supported", f"use one of {', '.join(DTYPES)}")
        return dtype
    name = (dtype or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise SlimlmError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so a wall-clock timer measures the work and not its launch."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def timer(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()
