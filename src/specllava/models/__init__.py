"""Model loading and assembly: the embedded default target/draft pair and its vision tower.

Importing this package registers the EfficientNet-Lite vision tower with the transformers Auto
classes (so `LlavaForConditionalGeneration.from_pretrained` can load the assembled models); it does
no other work. Building or loading models happens only when the functions below are called.
"""

from transformers import AutoConfig, AutoModel

from specllava.models.efficientnet_vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

# exist_ok: the package may be imported under two names (e.g. via a test runner's rootdir tricks).
AutoConfig.register(EfficientNetLiteVisionConfig.model_type, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)

from specllava.models.assemble import (  # noqa: E402  (the registration above must come first)
    DefaultModels,
    assemble_default_models,
    build_draft_from_target,
    load_default_models,
)

__all__ = [
    "DefaultModels",
    "EfficientNetLiteVisionConfig",
    "EfficientNetLiteVisionModel",
    "assemble_default_models",
    "build_draft_from_target",
    "load_default_models",
]
