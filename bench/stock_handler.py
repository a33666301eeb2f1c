"""The comparison point for bench/serve.py: what TorchServe's stock ``image_classifier`` handler does.

Per image: PIL decode at full size, torchvision.transforms Resize(256) / CenterCrop(224) /
ToTensor / Normalize, fp32, contiguous memory format, archived with batchSize 1. Written on
BaseHandler because the stock VisionHandler imports captum; the model is rebuilt from
metadata.json like ours (the stock way needs a model.py per class count), and top-k is capped
at the class count (the stock handler's fixed top-5 crashes on a 2-class model).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import models, transforms
from ts.torch_handler.base_handler import BaseHandler


class StockImageClassifier(BaseHandler):
    topk = 5
    image_processing = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.meta = json.loads((model_dir / "metadata.json").read_text())
        self.device = torch.device(f"cuda:{props['gpu_id']}" if torch.cuda.is_available()
                                   and props.get("gpu_id") is not None else "cpu")
        arch, classes = self.meta["arch"], self.meta["num_classes"]
        if arch.startswith("timm/"):  # how a timm user serves it: timm builds it by name
            import timm

            model = timm.create_model(arch.removeprefix("timm/"), num_classes=classes)
        else:
            model = models.get_model(arch, weights=None, num_classes=classes)
        weights = model_dir / context.manifest["model"]["serializedFile"]
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.to(self.device).eval()
        threads = int(((context.model_yaml_config or {}).get("handler") or {}).get("torch_threads") or 0)
        if threads:  # only for the bench's ablation: the stock handler keeps torch's default
            torch.set_num_threads(threads)
        self.initialized = True

    def preprocess(self, data: list[dict]) -> torch.Tensor:
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            images.append(self.image_processing(Image.open(io.BytesIO(image)).convert("RGB")))
        return torch.stack(images).to(self.device)

    def postprocess(self, data: torch.Tensor) -> list[dict]:
        probs = torch.softmax(data, dim=1)
        top = torch.topk(probs, min(self.topk, probs.shape[1]), dim=1)
        return [{self.meta["classes"][i]: p for p, i in zip(ps, idx, strict=True)}
                for ps, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
