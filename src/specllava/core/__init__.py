"""The decoding core: trees, drafting, verification, caches and the loop."""

from .config import METHODS, TreeConfig

# The decoder (torch, transformers) is imported on first use, so that core.config, which the
# command line reads to check arguments, imports nothing heavy.


def __getattr__(name: str):
    if name in ("SpecOutput", "SpeculativeDecoder"):
        from . import decoder

        return getattr(decoder, name)
    raise AttributeError(f"module 'specllava.core' has no attribute {name!r}")


__all__ = ["METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig"]
