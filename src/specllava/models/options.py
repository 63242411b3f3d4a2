"""Where and how models load: the options every command shares (`--dtype`, `--device`,
`--device-map`, `--attn-implementation`) and the choice of the default dtype for the hardware.

Commands add the flags with `add_load_args(parser)` and read them back with
`LoadOptions.from_args(args)`; the Python API takes a `LoadOptions` (or its fields) directly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2")


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


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: dtype ("auto" or a name), device ("cpu", "cuda", "cuda:1", ...; None =
    `default_device()`), an accelerate `device_map` for the target ("auto", "balanced", ...; None =
    the whole model on `device`), and transformers' `attn_implementation` (None = its default)."""

    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoadOptions":
        return cls(
            dtype=getattr(args, "dtype", "auto") or "auto",
            device=getattr(args, "device", None),
            device_map=getattr(args, "device_map", None),
            attn_implementation=getattr(args, "attn_implementation", None),
        )

    @property
    def resolved_device(self) -> str:
        return self.device or default_device()

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.resolved_device)


def add_load_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--dtype`, `--device`, `--device-map` and `--attn-implementation`."""
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES,
        help="model dtype; auto (default) = bfloat16 on a CUDA GPU that supports it (float16 on older ones) "
        "and on a CPU with native bf16 (avx512_bf16 / AMX), float32 elsewhere",
    )
    parser.add_argument("--device", default=None, help="device to load the models on: cpu, cuda, cuda:1, ... "
                        "(default: cuda when available, else cpu)")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="accelerate device map for the target, e.g. auto to shard it over the visible GPUs "
                        "(and offload what does not fit); default: the whole target on --device")
    parser.add_argument("--attn-implementation", default=None, choices=ATTN_CHOICES,
                        help="transformers' attention implementation (default: the model's own, sdpa for most)")
