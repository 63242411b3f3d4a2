"""Trained weights shipped in the package (``src/specllava/assets/default/``) and how they are applied.

Contract (the trainer writes these files, then `write_asset_checksums`; all are optional):

- ``target.safetensors``: tensors named as in the target's ``state_dict()`` (at least
  ``model.multi_modal_projector.*``) replace the assembled values. LoRA pairs ``<param>.lora_A``
  [r, in] and ``<param>.lora_B`` [out, r] are merged as ``param += lora_scale * B @ A``
  (``lora_scale`` from the file's metadata, default 1), so the target stays a plain LLaVA model.
- ``draft.safetensors``: tensors named as in the draft's ``state_dict()``; its metadata entry
  ``num_layers`` sets the draft's depth; the optional entry ``token_ranking`` (a JSON list of
  token ids, most frequent in the draft's training answers first) becomes the draft's
  ``config.token_ranking``, which picks a reduced draft vocabulary (`specllava.core.vocab`). Tensors it omits (e.g. the 49152 x 576 vocabulary embedding,
  which keeps the draft file small) keep `build_draft_from_target`'s values.
- ``SHA256SUMS``: ``<sha256>  <file name>`` per shipped file. `check_assets` verifies it and names any
  missing, unlisted or corrupt file in a RuntimeError. No weights and no SHA256SUMS is the valid
  "not trained yet" state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from specllava.core.vocab import RANKING_ATTR
from specllava.models.builders import build_draft_from_target

DEFAULT_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"
TARGET_WEIGHTS = "target.safetensors"
DRAFT_WEIGHTS = "draft.safetensors"
CHECKSUMS = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_asset_checksums(assets_dir: str | Path = DEFAULT_ASSETS_DIR) -> Path:
    """Write ``SHA256SUMS`` for the shipped weight files in ``assets_dir`` (run after training)."""
    assets_dir = Path(assets_dir)
    names = [n for n in (TARGET_WEIGHTS, DRAFT_WEIGHTS) if (assets_dir / n).is_file()]
    if not names:
        raise ValueError(f"no {TARGET_WEIGHTS} or {DRAFT_WEIGHTS} in {assets_dir}")
    path = assets_dir / CHECKSUMS
    path.write_text("".join(f"{sha256_file(assets_dir / n)}  {n}\n" for n in names))
    return path


def check_assets(assets_dir: str | Path = DEFAULT_ASSETS_DIR) -> dict[str, Path]:
    """Verify the shipped weights against ``SHA256SUMS``; return {file name: path} of those present.

    No weights and no checksum file is the valid "not trained yet" state (empty dict). Anything
    else that does not match raises RuntimeError naming the file.
    """
    assets_dir = Path(assets_dir)
    present = sorted(p.name for p in assets_dir.glob("*.safetensors")) if assets_dir.is_dir() else []
    sums_path = assets_dir / CHECKSUMS
    if not sums_path.is_file():
        if present:
            raise RuntimeError(
                f"shipped weights {present} in {assets_dir} have no {CHECKSUMS}; the trainer must run "
                f"specllava.models.shipped.write_asset_checksums({str(assets_dir)!r})"
            )
        return {}
    expected = {}
    for line in sums_path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            expected[name.strip()] = digest
    unknown = set(expected) - {TARGET_WEIGHTS, DRAFT_WEIGHTS}
    if unknown:
        raise RuntimeError(f"{sums_path} lists {sorted(unknown)}; the assembly knows only {TARGET_WEIGHTS} and {DRAFT_WEIGHTS}")
    unlisted = set(present) - set(expected)
    if unlisted:
        raise RuntimeError(f"{sorted(unlisted)} in {assets_dir} are not listed in {CHECKSUMS}; rerun write_asset_checksums")
    for name, digest in expected.items():
        path = assets_dir / name
        if not path.is_file():
            raise RuntimeError(f"shipped weight file {path} is missing (listed in {sums_path}); restore it from the specllava repository")
        if sha256_file(path) != digest:
            raise RuntimeError(
                f"shipped weight file {path} is corrupt (sha256 differs from {sums_path}); "
                "restore it from the specllava repository (git checkout / reinstall specllava)"
            )
    return {name: assets_dir / name for name in expected}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy named tensors into the model's parameters/buffers, refusing unknown names or shapes."""
    state = model.state_dict(keep_vars=True)
    for name, value in tensors.items():
        if name not in state:
            raise RuntimeError(f"{source}: tensor {name!r} is not a parameter of the model")
        if tuple(state[name].shape) != tuple(value.shape):
            raise RuntimeError(f"{source}: {name!r} has shape {tuple(value.shape)}, the model has {tuple(state[name].shape)}")
        with torch.no_grad():
            state[name].copy_(value.to(state[name].dtype))


def apply_target_weights(target: LlavaForConditionalGeneration, path: str | Path) -> None:
    """Load ``target.safetensors`` (replacements and LoRA pairs, see the module docstring) into ``target``."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    lora = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
    _copy_into(target, {k: v for k, v in tensors.items() if k not in lora}, path)
    scale = float(meta.get("lora_scale", 1.0))
    params = dict(target.named_parameters())
    for name_a in (k for k in lora if k.endswith(".lora_A")):
        base = name_a[: -len(".lora_A")]
        name_b = base + ".lora_B"
        if name_b not in lora or base not in params:
            raise RuntimeError(f"{path}: LoRA pair for {base!r} is incomplete or names no parameter")
        a, b = lora[name_a].float(), lora[name_b].float()  # [r, in], [out, r]
        weight = params[base]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise RuntimeError(f"{path}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit {base!r} {tuple(weight.shape)}")
        with torch.no_grad():
            weight.add_((scale * (b @ a)).to(weight.dtype))
    if len([k for k in lora if k.endswith(".lora_B")]) != len([k for k in lora if k.endswith(".lora_A")]):
        raise RuntimeError(f"{path}: unpaired .lora_B tensors")


def load_draft(target: LlavaForConditionalGeneration, path: str | Path) -> LlavaForConditionalGeneration:
    """The shipped draft: `build_draft_from_target` with the file's depth, then its tensors."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    if "num_layers" not in meta:
        raise RuntimeError(f"{path} lacks the 'num_layers' metadata entry the draft's depth is read from")
    draft = build_draft_from_target(target, num_layers=int(meta["num_layers"]))
    _copy_into(draft, tensors, path)
    if RANKING_ATTR in meta:  # the ids its training answers used, most frequent first (core.vocab)
        setattr(draft.config, RANKING_ATTR, [int(t) for t in json.loads(meta[RANKING_ATTR])])
    return draft


