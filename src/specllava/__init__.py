"""specllava: lossless speculative decoding with a dynamic token tree for LLaVA-family VLMs.

    from specllava import SpeculativeDecoder, load_default_models
    m = load_default_models()                      # .target, .draft, .processor
    dec = SpeculativeDecoder(m.target, m.draft, method="dynamic")
    out = dec.generate(input_ids=..., pixel_values=..., max_new_tokens=128)
    out.sequences, out.stats
"""

__all__ = ["METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig", "load_default_models"]
__version__ = "0.1.0"


def load_default_models(cache_dir=None, dtype="auto", draft=True, device=None):
    """The embedded default target, draft and processor, assembled into a local cache on first use
    (draft=False: the target and processor alone). dtype "auto" (default, as the CLI's --dtype):
    bf16 on a CUDA GPU or a CPU with native bf16, float32 elsewhere; device None: CUDA when
    available, else the CPU. `specllava.models.load_default_models` itself, imported on first
    call: `import specllava` does not load transformers' model code."""
    from .models import load_default_models as _load

    return _load(cache_dir=cache_dir, dtype=dtype, draft=draft, device=device)


def __getattr__(name: str):
    """The decoder's names, imported on first use: `import specllava` (and the CLI's --help) stays
    free of torch and transformers until the decoder is needed."""
    if name in ("METHODS", "SpecOutput", "SpeculativeDecoder", "TreeConfig"):
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module 'specllava' has no attribute {name!r}")
