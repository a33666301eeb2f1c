from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

from handler import model as served
from jobs.model import ModelError, build_model, freeze_backbone, head_module, split_backbone_head

ARCHS = ["resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny",
         "timm/tf_efficientnet_lite0", "timm/resnet18", "timm/convnext_nano"]


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
    # The server rebuilds the model from metadata.json alone: the state_dict must fit exactly.
    served.create(arch, num_classes=3).load_state_dict(model.state_dict())


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_large", "timm/tf_efficientnet_lite0",
                                  "timm/convnext_nano"])
def test_backbone_and_head_are_the_model_and_the_served_model_folds_batchnorm_exactly(arch):
    torch.manual_seed(0)
    model = build_model(arch, 2, "none")
    for m in model.modules():  # BatchNorm statistics unlike the identity, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    backbone, head = split_backbone_head(model)
    assert head is head_module(model)  # training the head trains the model
    meta = {"arch": arch, "num_classes": 2}
    server = served.build_model(meta, model.state_dict(), torch.device("cpu"))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(head(backbone(x)), model(x), atol=1e-5)
        features, logits = server(x)
        assert torch.allclose(logits, model(x), atol=1e-4) and torch.allclose(features, backbone(x), atol=1e-4)
    assert not [m for m in server.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # all folded


def test_timm_weights_from_a_local_file_load_and_set_the_preprocessing(real_weights: Path):
    model = build_model("timm/tf_efficientnet_lite0", 2, str(real_weights))
    saved = torch.load(real_weights, weights_only=True)
    assert torch.equal(model.conv_stem.weight, saved["conv_stem.weight"]) and model.classifier.out_features == 2
    spec = served.preprocess_spec("timm/tf_efficientnet_lite0")
    assert (spec["interpolation"], spec["mean"], spec["crop_size"], spec["resize_size"]) == (
        "bicubic", [0.5, 0.5, 0.5], 224, 256)
    assert served.preprocess_spec("resnet18")["interpolation"] == "bilinear"


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
    with pytest.raises(ModelError, match="timm has no model 'resnet19'"):
        build_model("timm/resnet19", 2, "none")


def test_module_calls_on_other_threads_wait_while_a_model_is_traced():
    """A torch.fx trace patches nn.Module.__call__ process-wide: KServe's runtime building the next version while it
    serves would otherwise fail the requests being decoded or forwarded meanwhile (handler.model.FX_TRACE)."""
    import threading

    net = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Conv2d(3, 3, 3, padding=1),
                                                               torch.nn.BatchNorm2d(3), torch.nn.ReLU())])
    other, x = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU()), torch.zeros(1, 3, 8, 8)
    errors: list[Exception] = []
    stop = threading.Event()

    def serving() -> None:
        while not stop.is_set():
            try:
                with served.FX_TRACE.shared():
                    other(x)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    thread = threading.Thread(target=serving)
    thread.start()
    try:
        for _ in range(20):
            served.fold_batchnorm(net)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:1]
