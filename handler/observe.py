"""What a runtime does with every answered request besides answering it: count it (``handler.answer_metrics``)
and, when capture is on, offer its images to the capture folder (``handler.capture``). Both runtimes call
``Observer.answered`` once per batch or request, after the answers exist and only for requests that got them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from handler.answer_metrics import AnswerMetrics
from handler.capture import DROP_REASONS, CaptureSettings, CaptureSink
from handler.protocol import Request


class Observer:
    def __init__(self, metrics: AnswerMetrics, capture: CaptureSink | None = None):
        self.metrics, self.capture = metrics, capture

    @classmethod
    def start(cls, metrics: AnswerMetrics, model_name: str, model_version: str,
              environ: Mapping[str, str] = os.environ) -> Observer:
        """With capture when the environment turns it on (``CaptureSettings.from_environ``)."""
        settings = CaptureSettings.from_environ(environ)
        if settings is None:
            return cls(metrics)
        metrics.counting_drops(DROP_REASONS)
        return cls(metrics, CaptureSink(settings, model_name, model_version))

    def answered(self, answered: list[tuple[Request, list[dict[str, Any]]]]) -> None:
        """Requests and their per-image answers (a refused request is never among them)."""
        self.metrics.record([a for _, answers in answered for a in answers])
        if self.capture is not None:
            for request, answers in answered:
                self.capture.offer(request.images, answers, request.request_id)
            self.metrics.dropped(self.capture.take_dropped())
