"""specllava: lossless speculative decoding with a dynamic token tree for LLaVA-family VLMs.

    from specllava import SpeculativeDecoder, load_default_models
    m = load_default_models()                      # .target, .draft, .processor
    dec = SpeculativeDecoder(m.target, m.draft, method="dynamic")
    out = dec.generate(input_ids=..., pixel_values=..., max_new_tokens=128)
    out.sequences, out.stats
"""

__all__ = ["METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig", "load_default_models"]
__version__ = "0.1.0"


def load_default_models(cache_dir=None, dtype=None):
    """The embedded default target/draft pair and processor, assembled in a local cache on first
    use (see `specllava.models.assemble`). Imported lazily: loading transformers' model code for
    the default pair is not needed just to use the decoder."""
    import torch

    from .models import load_default_models as _load

    return _load(cache_dir=cache_dir, dtype=dtype or torch.float32)


def __getattr__(name: str):
    """The decoder's names, imported on first use: `import specllava` (and the CLI's --help) stays
    free of torch and transformers until the decoder is needed."""
    if name in ("METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig"):
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module 'specllava' has no attribute {name!r}")
