"""A faster *draft* on the CPU: int8 weights with dynamic int8 activations (fbgemm / x86 kernels).

Only the draft is ever quantized. What the target emits never depends on the draft's numerics (the
draft only proposes; verification decides), so this changes speed and, slightly, acceptance: never
the output.

Why: on a CPU a small draft's forward is a handful of matrix-vector products, and bf16 ones are
slow without AMX, while int8 ones run on fbgemm's kernels (`tools/profile_decode.py` measures both;
docs/benchmarks.md).

`Int8Linear` holds a per-output-channel symmetric int8 copy of a Linear's weight, prepacked once;
its forward quantizes its input on the fly (`quantized::linear_dynamic`: one scale and zero point
for the whole input tensor), multiplies in int8 and returns the input's dtype, so it drops into a
bf16 or fp32 model (KV cache dtype unchanged).

Batched draft forwards (`core.batch`): since the activation scale spans the whole input, rows
quantized together would round each other's tokens. Inside `batch_rows(real)` an Int8Linear
quantizes each batch row's real tokens on their own, exactly the tensor that sequence feeds when
it steps alone, so a sequence drafts the same tree in a batch as alone (its sampled tokens
depend on the tree); pads get zeros.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings

import torch

QUANT_CHOICES = ("auto", "int8", "none")


def int8_supported(device: torch.device | str = "cpu") -> bool:
    """True when the CPU quantized-linear kernels exist in this torch build (fbgemm or x86)."""
    if torch.device(device).type != "cpu":
        return False
    engines = set(torch.backends.quantized.supported_engines)
    return bool(engines & {"fbgemm", "x86"}) and hasattr(torch.ops.quantized, "linear_dynamic")


def resolve_quant(quant: str | None, device: torch.device | str) -> str | None:
    """'auto' -> 'int8' on a CPU that supports it, else None; 'none'/None -> None."""
    if quant in (None, "none"):
        return None
    if quant == "auto":
        return "int8" if int8_supported(device) else None
    if quant == "int8":
        if not int8_supported(device):
            raise ValueError(
                f"draft_quant='int8' needs the draft on a CPU with torch's quantized kernels (fbgemm/x86); "
                f"the draft is on {torch.device(device)}. Use draft_quant='none' (or 'auto')."
            )
        return "int8"
    raise ValueError(f"unknown draft_quant {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")


_ROWS: contextvars.ContextVar[tuple[list[int], bool] | None] = contextvars.ContextVar("specllava_int8_rows",
                                                                                     default=None)


@contextlib.contextmanager
def batch_rows(real: list[int], last: bool = False):
    """Within: Int8Linear inputs [B, n, in] (or [B * n, in]) hold B sequences, row b's real
    tokens its first real[b] (last=True: its last real[b]; the rest pads, which get zeros; an
    input of fewer columns, such as the head's last one, holds the row's real tokens among them);
    each row is quantized on its own (see the module docstring)."""
    token = _ROWS.set((list(real), last))
    try:
        yield
    finally:
        _ROWS.reset(token)


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W in int8 (per output channel) and x quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [out]
        zero = torch.zeros_like(scale, dtype=torch.long)
        with warnings.catch_warnings():  # torch flags quantized-tensor creation as deprecated
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(
                qw, None if bias is None else bias.detach().float())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _ROWS.get()
        if rows is None or len(rows[0]) < 2:
            return self._linear(x)
        real, last = rows
        # [B, n, in] or its rows flattened batch-major, [B * n, in]
        per_row = x.reshape(len(real), -1, x.shape[-1])
        out = x.new_zeros(per_row.shape[:2] + (self.out_features,))
        cols = per_row.shape[1]
        for b, n in enumerate(real):
            n = min(n, cols)
            if n:
                part = slice(cols - n, cols) if last else slice(0, n)
                out[b, part] = self._linear(per_row[b, part])
        return out.reshape(x.shape[:-1] + (self.out_features,))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=True: fbgemm's int8 x int8 products accumulate in int16 pairs; 7-bit
        # activations keep them from saturating
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every nn.Linear inside `module` by an Int8Linear, in place; returns the module."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
        else:
            quantize_linears(child)
    return module


def int8_decoder(model) -> torch.nn.Module:
    """A copy of `model`'s text decoder (the transformer body under the LM head) with int8 linears.

    The token embedding is shared with the original rather than copied. The copy runs the decode
    steps of a draft whose prefill (image included) ran on the original model: same cache layout,
    same dtype.
    """
    body = model.get_decoder()
    embed = body.get_input_embeddings()
    body.set_input_embeddings(None)  # not deep-copied: shared below
    try:
        fast = copy.deepcopy(body)
    finally:
        body.set_input_embeddings(embed)
    fast.set_input_embeddings(embed)
    return quantize_linears(fast).eval()
