"""The EfficientNet-Lite vision tower: LLaVA's interface, ImageNet weights, safetensors round trip."""

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from transformers import AutoConfig, AutoModel

import specllava.models  # noqa: F401  (registration)
from specllava.models.efficientnet_vision import (
    EfficientNetLiteVisionConfig,
    EfficientNetLiteVisionModel,
    efficientnet_lite0_imagenet,
    efficientnet_lite0_weights_path,
)


@pytest.fixture(scope="module")
def tower():
    return efficientnet_lite0_imagenet()


def test_features_are_the_packages_final_feature_map_flattened(tower):
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(efficientnet_lite0_weights_path(), weights_only=True))
    reference.eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower(pixels, return_dict=True, output_hidden_states=-1)
        expected = reference.extract_features(pixels)  # [2, 1280, 7, 7]
    assert out.last_hidden_state.shape == (2, 49, 1280)
    assert out.hidden_states[-1] is out.last_hidden_state
    # token 7*r + c is grid cell (r, c)
    torch.testing.assert_close(out.last_hidden_state[:, 7 * 3 + 5], expected[:, :, 3, 5])
    torch.testing.assert_close(out.pooler_output, expected.mean(dim=(2, 3)))


def test_refuses_other_image_sizes(tower):
    with pytest.raises(ValueError, match="224, 224"):
        tower(torch.zeros(1, 3, 256, 256))


def test_config_rejects_non_lite_variant():
    with pytest.raises(ValueError, match="efficientnet-lite"):
        EfficientNetLiteVisionConfig(variant="efficientnet-b0")


def test_auto_classes_round_trip_through_safetensors(tower, tmp_path):
    tower.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EfficientNetLiteVisionConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EfficientNetLiteVisionModel)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).last_hidden_state, tower(pixels).last_hidden_state)
    assert not any(k.startswith("backbone._fc") for k in loaded.state_dict())
