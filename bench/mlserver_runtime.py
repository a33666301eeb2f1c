"""Seldon's MLServer on the serving package, for bench/serve.py's runtime comparison only (the runtime we ship
is KServe's: docs/serving-runtimes.md says why). Open Inference Protocol V2 only -- MLServer has no V1 --
with BYTES inputs holding base64 images, answered through ``ImageClassifier`` and ``protocol.answer_body``.

bench/serve.py writes ``settings.json`` and ``model-settings.json`` (``mlserver_settings``) and runs
``mlserver start FOLDER`` from an interpreter that has MLServer (its FastAPI pins clash with KServe's,
so the two never share a venv); MLServer's own adaptive batching and parallel workers follow the same
serving plan as the other runtimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from handler import scheduler
from handler.protocol import BadRequest, answer_body, parse_request
from handler.service import ImageClassifier


class ClassifierRuntime(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        plan = scheduler.serving_plan(gpus=0)
        torch.set_num_threads(plan.threads)
        self.classifier = ImageClassifier(Path(self.settings.parameters.uri), torch.device("cpu"),
                                          options=extra.get("options") or {})
        self.classifier.forward(torch.zeros(1, *self.classifier.meta["input_size"]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        doc = {"id": payload.id, "inputs": [{"name": i.name, "datatype": i.datatype, "data": _flat(i.data.root)}
                                            for i in payload.inputs]}
        clf = self.classifier
        try:
            req = parse_request(doc, {})
            req.topk = clf.topk(req.topk)
            clf.admit(req.images)
            tensors = clf.decode(req.images)
        except BadRequest as e:
            raise MLServerError(str(e), status_code=e.status) from None
        per_image = clf.answers(clf.forward(torch.stack(tensors)), [req.topk] * len(tensors))
        body = answer_body(req, per_image, self.name, self.version)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[ResponseOutput(**o) for o in body["outputs"]])


def _flat(data: Any) -> list:
    return [x for d in data for x in (d if isinstance(d, list) else [d])]
