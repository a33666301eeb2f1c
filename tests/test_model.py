from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

from jobs.model import ModelError, build_model, freeze_backbone, head_module, split_backbone_head

ARCHS = ["resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_supported_arch_builds_trains_its_head_and_loads_where_the_server_loads_it(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3, weights="none")
    trainable = freeze_backbone(model)
    assert trainable == list(head_module(model).parameters())
    assert head_module(model).out_features == 3
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    # The handler rebuilds the model from metadata.json alone: the state_dict must fit exactly.
    models.get_model(arch, weights=None, num_classes=3).load_state_dict(model.state_dict())


def test_only_plain_feature_extractors_use_the_feature_cache():
    resnet = build_model("resnet18", 2, "none").eval()
    backbone, head = split_backbone_head(resnet)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(head(backbone(x)), resnet(x), atol=1e-5)
    assert split_backbone_head(build_model("efficientnet_b0", 2, "none")) is None


def test_local_weights_file_with_an_imagenet_head_is_accepted(tmp_path: Path):
    imagenet_shaped = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_shaped.state_dict(), path)
    model = build_model("resnet18", 2, str(path))
    assert torch.equal(model.conv1.weight, imagenet_shaped.conv1.weight)
    assert model.fc.out_features == 2


@pytest.mark.parametrize("weights, message", [
    ("missing.pth", "not found"),
    ("wrong_arch", "does not match arch 'resnet18'"),
    ("garbage", "not a loadable state_dict"),
])
def test_bad_weights_name_the_file_and_the_fix(tmp_path: Path, weights, message):
    path = tmp_path / weights
    if weights == "wrong_arch":
        torch.save(models.mobilenet_v3_small(weights=None).state_dict(), path)
    elif weights == "garbage":
        path.write_bytes(b"nope")
    with pytest.raises(ModelError, match=message):
        build_model("resnet18", 2, str(path))


def test_unknown_arch_is_named():
    with pytest.raises(ModelError, match="unknown arch 'resnet19'"):
        build_model("resnet19", 2, "none")
