"""One exported model ready to answer, whatever serves it: TorchServe's handler, another runtime, or
``jobs predict``. It knows nothing of any server: bytes in, per-image answers out.

``ImageClassifier`` reads ``metadata.json`` (the contract with training), builds the model in the
precision the export chose for this kind of machine on the engine ``serve_backend`` picks
(``handler.engines``), refuses images over the pixel limits from their
headers alone, decodes, and turns logits into calibrated top-k answers with the trust fields. Its two
halves apart from the model, ``ImageDecoder`` (bytes -> input tensors) and ``ModelAnswers`` (features and
logits -> answers), serve a runtime that runs the model elsewhere: Triton's Python steps around its ONNX
model (``handler.triton_backend``).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from handler import engines, files
from handler.preprocess import Preprocessor, image_header
from handler.protocol import BadRequest, parse_topk, where
from handler.trust import LOW_CONFIDENCE, UNLIKE_TRAINING, Trust

logger = logging.getLogger(__name__)

DEFAULT_TOPK = 5
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default
# Pixels decoded per batch: bounds a batch's decode time far below a server's timeout on a slow CPU.
DEFAULT_MAX_BATCH_PIXELS = 200_000_000
MAX_ASPECT_RATIO = 16  # beyond this, Resize(short side) would blow a thin strip up into a huge tensor


@dataclass
class Outputs:
    """A batch's answers before top-k, fp32 on the CPU: the calibrated probabilities, the raw logits, and per
    image the trust fields (``ood_score``, ``abstain``, ``abstain_reason``; empty dicts for a model exported
    without them)."""

    probs: torch.Tensor
    logits: torch.Tensor
    trust: list[dict[str, Any]]


class ImageDecoder:
    """Image bytes -> the model's input tensors: refuses images over the pixel limits from their headers alone,
    then decodes with the ``Preprocessor`` training used. ``spec``: ``metadata.json["preprocess"]``;
    ``options``: max_image_pixels, max_batch_pixels (both optional).

    Apart from the model, so a runtime that runs the model elsewhere (Triton's ONNX step) decodes the same way.
    """

    def __init__(self, spec: dict[str, Any], options: dict[str, Any] | None = None):
        options = options or {}
        self.max_image_pixels = int(options.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)
        self.max_batch_pixels = int(options.get("max_batch_pixels") or DEFAULT_MAX_BATCH_PIXELS)
        # Pillow's own bomb check is the backstop for formats whose size only Pillow can read: it raises
        # at twice this, and the header check refuses everything above it first.
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        Image.init()  # register every Pillow format now, not during the first request
        self.preprocessor = Preprocessor(spec)

    # -- admission and decoding -------------------------------------------------------------------

    def pixels(self, data: bytes, n: int = 0, total: int = 1) -> int:
        """Pixels image ``n`` of ``total`` will decode to, from its header alone; refuses bombs and thin strips."""
        at = where(n, total)
        if not data:
            raise BadRequest(f"{at}empty body (0 bytes)")
        header = image_header(data)
        if header is not None:
            size = header[1]
            decoded = self.preprocessor.decoded_pixels(*header)
        else:  # not PNG/JPEG: Pillow parses the header (and itself refuses twice the pixel limit)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    size = img.size
            except Image.DecompressionBombError:
                raise BadRequest(f"{at}image too large: more than {self.max_image_pixels} pixels "
                                 "(max_image_pixels)", 413) from None
            except Exception:  # noqa: BLE001 -- whatever Pillow cannot parse is the client's broken file
                raise BadRequest(f"{at}not a decodable image (unrecognised format or corrupt header; "
                                 "send JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
            decoded = size[0] * size[1]
        w, h = size
        if w * h > self.max_image_pixels:
            raise BadRequest(f"{at}image too large: {w}x{h} is more than {self.max_image_pixels} pixels "
                             "(max_image_pixels)", 413)
        if min(w, h) == 0 or max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise BadRequest(f"{at}aspect ratio of {w}x{h} is beyond {MAX_ASPECT_RATIO}:1")
        return decoded

    def admit(self, images: list[bytes]) -> int:
        """The pixels a request's images decode to; 413 when one request alone exceeds a batch's budget."""
        total = sum(self.pixels(data, n, len(images)) for n, data in enumerate(images))
        if total > self.max_batch_pixels:
            raise BadRequest(f"the request's images decode to {total} pixels; the limit per request is "
                             f"{self.max_batch_pixels} (max_batch_pixels)", 413)
        return total

    def decode(self, images: list[bytes]) -> list[torch.Tensor]:
        """The model's input tensors; a 400 naming the image that is not one."""
        tensors = []
        for n, data in enumerate(images):
            try:
                tensors.append(self.preprocessor(data))
            except ValueError as e:
                raise BadRequest(f"{where(n, len(images))}{e}") from None
        return tensors

class ModelAnswers:
    """The model's outputs -> the answers: calibrated probabilities, the trust fields and the top-k predictions.

    ``model_dir`` holds ``metadata.json`` and what the trust fields need; ``options``: topk, min_confidence
    (abstain below this calibrated top probability; overrides the export's), both optional. Apart from the
    model, so a runtime that runs the model elsewhere (Triton's ONNX step) answers the same way.
    """

    def __init__(self, model_dir: Path, options: dict[str, Any] | None = None):
        options = options or {}
        self.model_dir = Path(model_dir)
        self.meta: dict = json.loads((self.model_dir / files.METADATA).read_text())
        self.classes: list[str] = list(self.meta["classes"])
        self.default_topk = int(options.get("topk") or self.meta.get("topk") or DEFAULT_TOPK)
        # Calibration and "none of these", as the export fit them; an archive from before them answers without.
        self.trust = Trust.from_metadata(self.model_dir, self.meta["trust"]) if self.meta.get("trust") else None
        if self.trust is not None and options.get("min_confidence") is not None:
            self.trust.min_confidence = float(options["min_confidence"]) or None

    def outputs(self, features: torch.Tensor, logits: torch.Tensor) -> Outputs:
        """A batch's calibrated probabilities and trust fields from the model's (features, logits)."""
        if self.trust is None:
            return Outputs(logits.softmax(1), logits, [{} for _ in range(len(logits))])
        probs, fields = self.trust.assess(features, logits)
        return Outputs(probs, logits, fields)

    def answers(self, outputs: Outputs, topk: list[int]) -> list[dict[str, Any]]:
        """Per image: ``predictions`` (top ``topk[i]``, most likely first) and the trust fields."""
        out = []
        for i, k in enumerate(topk):
            top = torch.topk(outputs.probs[i], min(k, len(self.classes)))
            predictions = [{"label": self.classes[c], "index": c, "probability": p}
                           for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
            out.append({"predictions": predictions, **outputs.trust[i]})
        return out

    def answer_kinds(self) -> dict[str, Any]:
        """What ``handler.answer_metrics.AnswerMetrics`` starts at zero: the classes, the abstain reasons this model
        can give, and the abstain rate its export expects on in-distribution images."""
        if self.trust is None:
            return {"classes": self.classes, "reasons": (), "expected_abstain_rate": None}
        reasons = (UNLIKE_TRAINING, LOW_CONFIDENCE) if self.trust.min_confidence else (UNLIKE_TRAINING,)
        return {"classes": self.classes, "reasons": reasons,
                "expected_abstain_rate": self.trust.expected_abstain_rate}

    def topk(self, requested: Any) -> int:
        return parse_topk(requested, self.default_topk, len(self.classes))


class ImageClassifier(ImageDecoder, ModelAnswers):
    """``model_dir`` holds ``metadata.json``, the weights file and what the trust fields need.

    ``options`` (all optional): topk, max_image_pixels, max_batch_pixels, precision (auto, fp32, bf16,
    fp16), backend (``handler.engines.BACKENDS``: the engine that runs the model), min_confidence (abstain below
    this calibrated top probability; overrides the export's) -- the archive's model-config ``handler`` section,
    or a runtime's settings.
    """

    def __init__(self, model_dir: Path, device: torch.device, weights: Path | None = None,
                 options: dict[str, Any] | None = None):
        options = options or {}
        ModelAnswers.__init__(self, model_dir, options)
        ImageDecoder.__init__(self, self.meta["preprocess"], options)
        self.device = device
        choice = engines.choose(self.meta, self.model_dir, weights or self.model_dir / files.WEIGHTS, device,
                                str(options.get("backend") or "auto"), str(options.get("precision") or "auto"))
        self.engine, self.precision = choice.engine, choice.engine.precision
        self.backend = engines.describe(choice)  # which engine serves, in which precision, and why
        logger.info("backend %s (%s): %s", self.engine.name, self.precision, choice.why)

    # -- the model --------------------------------------------------------------------------------

    def forward(self, batch: torch.Tensor) -> Outputs:
        if not len(batch):  # every request of the batch was refused
            return Outputs(torch.zeros(0, len(self.classes)), torch.zeros(0, len(self.classes)), [])
        return self.outputs(*self.engine.run(batch))
