"""Offline prediction from an exported model folder: what the server answers, for a folder of photos.

The model, preprocessing, precision, calibration, top-k and trust fields come from
``handler.service.ImageClassifier``, the class every serving runtime answers with, so the answers
match the server's (tests/test_handler.py, tests/test_torchserve.py). Images are decoded in DataLoader
workers and go through the model in batches; a file that is not an image is reported, not fatal.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from handler import files
from handler.protocol import BadRequest
from handler.service import ImageClassifier
from jobs.errors import JobError
from jobs.fileio import atomic_write_text

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
OUTPUT_FORMATS = (".csv", ".jsonl")
AHEAD = 2  # batches decoding while one is classified: keeps the model fed, bounds the decoded images held


def load_classifier(model_dir: Path, device: torch.device | None = None, backend: str = "auto") -> ImageClassifier:
    """The exported model as the server loads it (int8 where offered; bf16 only where native), on ``backend``'s
    engine (``serve_backend``'s choices)."""
    model_dir = Path(model_dir)
    if not (model_dir / files.METADATA).exists() or not (model_dir / files.WEIGHTS).exists():
        raise JobError(f"{model_dir} lacks metadata.json or model.pt; pass the model/ folder of a finished run")
    return ImageClassifier(model_dir, device or torch.device("cpu"), options={"backend": backend})


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images, glob patterns expanded; in a stable order.

    A name that yields nothing (a missing file, a pattern that matches nothing, a folder without images)
    is kept, so that it is reported as a failed input rather than silently skipped.
    """
    found: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += images or [path]
        elif not path.exists() and glob.has_magic(str(given)):
            matches = sorted(Path(p) for p in glob.glob(str(given), recursive=True))
            found += [p for p in matches if p.is_file()] or [path]
        else:
            found.append(path)
    return list(dict.fromkeys(found))


class _Decoded:
    """File i -> (i, input tensor or None, error or None): a bad file is one row, not a crashed command."""

    def __init__(self, files: list[Path], classifier: ImageClassifier):
        self.files, self.decode = files, classifier.decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.decode([self.files[i].read_bytes()])[0], None
        except IsADirectoryError:
            return i, None, "is a folder with no images"
        except OSError as e:
            return i, None, e.strerror or type(e).__name__
        except BadRequest as e:
            return i, None, str(e)


@dataclass
class Summary:
    classified: int
    failed: int
    seconds: float
    first_error: dict | None


def predict(model_dir: Path, inputs: Iterable[str | Path], topk: int | None = None, batch_size: int = 32,
            decode_threads: int = 0, device: torch.device | None = None, progress: bool = False,
            backend: str = "auto", say_backend: bool = False) -> Iterator[dict[str, Any]]:
    """One result per input file, in order: the server's answer (``predictions`` and the trust fields) and
    ``probabilities`` for every class, or ``error``. ``decode_threads``: threads decoding the next batches
    while the model runs this one (0: decode in turn). ``say_backend``: one line on stderr naming the engine."""
    classifier = load_classifier(model_dir, device, backend)
    if say_backend:
        chosen = classifier.backend
        print(f"predict: on {chosen['backend']} ({chosen['precision']}): {chosen['why']}", file=sys.stderr)
    files = expand_inputs(inputs)
    k = classifier.topk(topk)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    for rows in _decoded_batches(_Decoded(files, classifier), batch_size, decode_threads):
        good = [(i, x) for i, x, _ in rows if x is not None]
        answers: dict[int, dict] = {}
        if good:
            outputs = classifier.forward(torch.stack([x for _, x in good]))
            for (i, _), answer, probs in zip(good, classifier.answers(outputs, [k] * len(good)),
                                             outputs.probs.tolist(), strict=True):
                answers[i] = {**answer, "probabilities": probs}
        for i, _, error in rows:
            yield {"file": str(files[i]), **(answers[i] if error is None else {"error": error})}
        bar.update(len(rows))
    bar.close()


def _decoded_batches(decoded: _Decoded, batch_size: int, threads: int) -> Iterator[list]:
    """``decoded``'s rows in batches, in order. With ``threads``, up to ``AHEAD`` batches are decoded on a
    thread pool while the caller classifies the one before: PIL's decoding and the resize release the GIL.
    Threads, not DataLoader processes: a process forked from one holding ONNX Runtime's or OpenVINO's
    thread pools crashes (jobs.backends._outputs_apart), and threads start at once."""
    batches = [range(start, min(start + batch_size, len(decoded))) for start in range(0, len(decoded), batch_size)]
    if threads <= 0:
        for batch in batches:
            yield [decoded[i] for i in batch]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="predict-decode") as pool:
        pending: deque[list[Future]] = deque()
        for batch in batches:
            pending.append([pool.submit(decoded.__getitem__, i) for i in batch])
            if len(pending) > AHEAD:
                yield [row.result() for row in pending.popleft()]
        while pending:
            yield [row.result() for row in pending.popleft()]


def write_results(results: Iterable[dict], output: Path | None) -> Summary:
    """Results to ``output`` (.csv or .jsonl, written atomically) or as JSON lines to stdout; the summary."""
    start, classified, failed, first_error = time.perf_counter(), 0, 0, None
    buffer = io.StringIO() if output is not None else sys.stdout
    writer = None
    if output is not None and output.suffix == ".csv":
        writer = csv.writer(buffer)
        writer.writerow(["file", "label", "probability", "topk", "ood_score", "abstain", "abstain_reason", "error"])
    for result in results:
        if "error" in result:
            failed += 1
            first_error = first_error or result
        else:
            classified += 1
        if writer is not None:
            writer.writerow(_csv_row(result))
        else:
            shown = {k: v for k, v in result.items() if k != "probabilities"}
            buffer.write(json.dumps(shown) + "\n")
    if output is not None:
        atomic_write_text(output, buffer.getvalue())
    return Summary(classified, failed, time.perf_counter() - start, first_error)


def _csv_row(result: dict) -> list:
    if "error" in result:
        return [result["file"], "", "", "", "", "", "", result["error"]]
    top = result["predictions"]
    return [result["file"], top[0]["label"], f"{top[0]['probability']:.6f}",
            json.dumps([[p["label"], round(p["probability"], 6)] for p in top]),
            "" if "ood_score" not in result else f"{result['ood_score']:.6f}",
            "" if "abstain" not in result else str(result["abstain"]).lower(),
            result.get("abstain_reason") or "", ""]


def check_output(output: Path | None) -> None:
    if output is not None and output.suffix not in OUTPUT_FORMATS:
        raise JobError(f"--output {output}: name a .csv or .jsonl file")
