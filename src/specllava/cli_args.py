"""Argparse types that refuse bad command-line values at parse time, before anything loads.

Each is a plain function `str -> value` raising `argparse.ArgumentTypeError` with a message that
says what was wrong; argparse prefixes the option's name and exits with status 2:

    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--image", type=image_file)
    p.add_argument("--tree-option", type=tree_option, action="append", default=[])

Reusable by any command (and a server's request parsing). Cheap to import: torch and PIL are
imported only inside the types that need them, when such a value is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import warnings
from pathlib import Path

Error = argparse.ArgumentTypeError


# -- numbers -----------------------------------------------------------------------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Error(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise Error(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise Error(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (token counts, steps, threads, limits)."""
    value = _int(text)
    if value < 1:
        raise Error(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (top-k, where 0 turns it off; counts that may be zero)."""
    value = _int(text)
    if value < 0:
        raise Error(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """A decoding seed: any integer (`core.sampling.mix_seed` mixes it whole, so 2**64 is not seed 0)."""
    return _int(text)


def torch_seed(text: str) -> int:
    """A seed for `torch.manual_seed` (the training commands): an integer in [0, 2**64)."""
    value = _int(text)
    if not 0 <= value < 2**64:
        raise Error(f"must be an integer in [0, 2**64), got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (temperature: 0 = greedy)."""
    value = _float(text)
    if value < 0:
        raise Error(f"must be >= 0, got {value:g}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, minutes)."""
    value = _float(text)
    if value <= 0:
        raise Error(f"must be > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (top-p: 1 turns it off)."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise Error(f"must be in (0, 1], got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (held-out and test fractions)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise Error(f"must be in [0, 1), got {value:g}")
    return value


def prompt_text(text: str) -> str:
    """A prompt with something in it, in valid UTF-8 (Python hands undecodable bytes of the command
    line over as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise Error(f"the prompt is not valid UTF-8 ({what} at character {err.start}); "
                    "give the text in UTF-8") from None
    if not text.strip():
        raise Error("the prompt is empty")
    return text


# -- files -------------------------------------------------------------------------------------
def _stat(text: str, what: str) -> os.stat_result:
    """os.stat of a path the user gave, with each way it can fail said in words."""
    if not text:
        raise Error(f"the {what} path is empty")
    try:
        return os.stat(Path(text).expanduser())
    except FileNotFoundError:
        raise Error(f"{what} not found: {text}") from None
    except PermissionError:
        raise Error(f"cannot read {what} {text}: permission denied") from None
    except OSError as err:  # a symlink loop (ELOOP), a name too long, a path through a file, ...
        raise Error(f"cannot open {what} {text}: {err.strerror}") from None


def _regular_file(text: str, what: str) -> Path:
    """A readable regular file: a folder, a FIFO or a device is refused (reading a FIFO would
    block until something writes to it)."""
    st = _stat(text, what)
    if stat.S_ISDIR(st.st_mode):
        raise Error(f"{text} is a directory, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not stat.S_ISREG(st.st_mode):
        raise Error(f"{text} is not a regular file (a FIFO, socket or device); give {what} on disk")
    path = Path(text).expanduser()
    if not os.access(path, os.R_OK):
        raise Error(f"cannot read {what} {text}: permission denied")
    return path


def existing_file(text: str) -> Path:
    """A readable regular file."""
    return _regular_file(text, "file")


def existing_dir(text: str) -> Path:
    """An existing folder."""
    st = _stat(text, "folder")
    if not stat.S_ISDIR(st.st_mode):
        raise Error(f"{text} is a file, not a folder")
    return Path(text).expanduser()


def existing_path(text: str) -> Path:
    """An existing file or folder."""
    _stat(text, "file or folder")
    return Path(text).expanduser()


def image_file(text: str) -> str:
    """An image file PIL can decode completely, of at most `PIL.Image.MAX_IMAGE_PIXELS` pixels
    (about 89 million: a larger one is refused as a decompression bomb, as PIL itself does).
    Decoded here once, so a truncated or corrupt file fails at parse time, not after loading."""
    path = _regular_file(text, "image file")
    from PIL import Image, UnidentifiedImageError

    cap = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(path) as img:
                width, height = img.size
                if cap is not None and width * height > cap:
                    raise Error(_too_large(text, width, height, cap))
                img.load()
    except Image.DecompressionBombError:  # PIL refuses on opening an image of over twice the cap
        raise Error(f"{text} has more than {2 * cap:,} pixels, over the cap of {cap:,} pixels "
                    "(PIL.Image.MAX_IMAGE_PIXELS, against decompression bombs); downscale it") from None
    except UnidentifiedImageError:
        raise Error(f"not an image file PIL can read: {text}") from None
    except OSError as err:  # truncated or corrupt data, read errors
        raise Error(f"cannot decode image file {text}: {err}") from None
    return str(path)


def _too_large(text: str, width: int, height: int, cap: int) -> str:
    return (f"{text} is {width}x{height} = {width * height:,} pixels, over the cap of {cap:,} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS, against decompression bombs); downscale it")


def _looks_local(text: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a local path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def model_source(text: str) -> str:
    """A model folder (holding config.json) or a Hugging Face hub id (`owner/name`)."""
    if not text.strip():
        raise Error("the model path is empty; give a model folder or a hub id")
    path = Path(text).expanduser()
    if path.is_file():
        raise Error(f"{text} is a file; give the model's folder (the one holding config.json) or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise Error(f"{text} has no config.json: not a model folder")
        return str(path)
    if _looks_local(text):
        raise Error(f"model folder not found: {text}")
    return text


def draft_source(text: str) -> str:
    """A draft model folder or hub id, or an EAGLE head (train-eagle's eagle_head.safetensors or
    the folder holding it)."""
    if not text.strip():
        raise Error("the draft path is empty; give a draft model's folder, a hub id or an EAGLE head")
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return str(path)
    if path.is_dir() and (path / "eagle_head.safetensors").is_file():
        return str(path)
    try:
        return model_source(text)
    except Error as err:
        if path.is_file():
            raise Error(f"{text} is a file but not an EAGLE head (.safetensors); give a draft model's folder, "
                        "a hub id or an EAGLE head") from None
        raise err from None


# -- tree options --------------------------------------------------------------------------------
def tree_option(text: str) -> tuple[str, object]:
    """`NAME=VALUE` for a `TreeConfig` field: VALUE parsed as the field's type (an integer, a number,
    `none` for node_budget, a JSON list of rank paths for choices) and checked against its range."""
    from .core.config import FLOAT_RANGES, INT_FIELDS, TreeConfig

    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise Error(f"tree option {text!r} must look like NAME=VALUE, e.g. node_budget=48")
    known = list(TreeConfig.__dataclass_fields__)
    if name not in known:
        raise Error(f"unknown tree option {name!r}; known: {', '.join(known)}")
    parsed: object
    if name == "node_budget" and value.lower() in ("none", "null"):
        parsed = None
    elif name in INT_FIELDS:
        try:
            parsed = int(value)
        except ValueError:
            raise Error(f"tree option {name} takes an integer, got {value!r}") from None
    elif name in FLOAT_RANGES:
        try:
            parsed = float(value)
        except ValueError:
            raise Error(f"tree option {name} takes a number, got {value!r}") from None
    else:  # choices
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise Error(f"tree option {name} takes a JSON list of rank paths, e.g. [[0],[1],[0,0]], got {value!r}") from None
    try:
        TreeConfig(**{name: parsed})
    except ValueError as err:
        raise Error(f"tree option {name}={value}: {err}") from None
    return name, parsed


def budget(text: str) -> int | str:
    """`auto` or an integer >= 1: the dynamic tree's node budget."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise Error(f"must be 'auto' or a positive integer, got {text!r}") from None
    if value < 1:
        raise Error(f"must be >= 1, got {value}")
    return value
