"""Where and how models load: the choice of the default dtype and device for the hardware.

The options themselves, `LoadOptions` (`--dtype`, `--device`, `--device-map`,
`--attn-implementation`), are declared in `specllava.options` (cheap to import, for --help) and
re-exported here; the Python API takes a `LoadOptions` (or its fields) directly.
"""

from __future__ import annotations

import torch

from ..options import ATTN_CHOICES, DTYPE_CHOICES, LoadOptions, add_load_args  # noqa: F401  (this module's API too)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """"cuda" when a CUDA device is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """True on a CPU with native bf16 arithmetic (x86 avx512_bf16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The fastest exact-enough dtype for `device`: bf16 on a CUDA GPU that supports it (fp16 on an
    older one) and on a CPU with native bf16; float32 elsewhere."""
    dev = torch.device(device or default_device())
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype from its name ("auto", "float32", "bfloat16", "float16") or a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return auto_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}") from None
