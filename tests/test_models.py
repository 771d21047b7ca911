import pytest
import torch

from mosaic_flwr.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 100)])
def test_features_head_contract(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size).eval()
    x = torch.randn(3, channels, size, size)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == classes
    assert torch.allclose(model(x), model.head(feats), atol=1e-6)


def test_resnet18_size_matches_reference():
    # The authors' CIFAR ResNet-18 has 11,173,962 parameters for 10 classes.
    assert sum(p.numel() for p in build_model("resnet18", 3, 10, 32).parameters()) == 11_173_962


def test_unknown_model():
    with pytest.raises(ValueError, match=r"model: unknown value 'vgg'.*allowed"):
        build_model("vgg", 1, 10, 28)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_scales_every_hidden_layer_but_not_input_or_classes(name):
    full = build_model(name, 1, 10, 28)
    half = build_model(name, 1, 10, 28, width=0.5)
    assert half.feature_dim == full.feature_dim // 2
    for key, value in full.state_dict().items():
        sub = half.state_dict()[key]
        assert sub.ndim == value.ndim and all(s <= f for s, f in zip(sub.shape, value.shape)), key
    assert half.head.out_features == 10
    with pytest.raises(ValueError, match="width"):
        build_model(name, 1, 10, 28, width=1.5)
