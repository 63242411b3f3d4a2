"""specllava: lossless speculative decoding with a dynamic token tree for LLaVA-family VLMs."""

from .core import METHODS, SpecOutput, SpeculativeDecoder, TreeConfig

__all__ = ["METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig"]
__version__ = "0.1.0"
