"""The decoding core: trees, drafting, verification, caches and the loop."""

from .config import METHODS, TreeConfig
from .decoder import SpecOutput, SpeculativeDecoder

__all__ = ["METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig"]
