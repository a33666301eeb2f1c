"""Export-time: the portable graph (``model/model.onnx``) and the check that admits each engine that runs it.

The graph is the served ``Classifier`` (BatchNorm folded) traced with a dynamic batch, its two outputs the
penultimate features and the logits, as ``handler.model.Classifier.forward`` returns them. Each engine
(``handler.engines``: ONNX Runtime fp32; OpenVINO in its bf16 where the CPU has it, and in fp32) then runs
the val split (at most ``ENGINE_CHECK_IMAGES`` of it, evenly spread), decoded once for all of them, and is
compared with the state_dict's fp32 outputs that the bf16 check computed (no second PyTorch pass). It is
admitted only where its answers are the same: top-1 agreement, the largest difference of a calibrated
probability, and the same abstain decisions (``GATES``: in bf16, the gate bf16 autocast passes).
``metadata.json["backends"]`` records each verdict with its figures; the server chooses among the admitted
engines (``serve_backend``). An architecture that does not export says so in one line and serves on torch
as before.

Asked for int8 (``serve_precision: int8``), the check also quantizes the graph with NNCF's post-training
quantization, calibrated on training images (``model/model-int8.xml``, OpenVINO's IR), and checks it the same
way, in int8's gate: one more engine, ``openvino-int8``, that ``auto`` measures beside the others.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from handler import engines, files, precision
from handler import model as models
from handler.preprocess import Preprocessor
from handler.trust import Trust
from jobs.config import RunPaths
from jobs.data import ImageFiles, load_splits, make_loader, split_items
from jobs.fileio import atomic_write_bytes
from jobs.parity import INT8_CALIBRATION_IMAGES, Outputs, Rows
from jobs.process import exit_process

CPU = torch.device("cpu")
OPSET = 17  # ONNX Runtime 1.32 and OpenVINO 2026.4 both run it in full
# Per precision, how close to the state_dict's fp32 answers on the val split an engine must come. fp32: the
# same answers (the same function, rounded otherwise; issue 28's bar). bf16: the gate bf16 autocast passes
# (jobs/parity.py). bf16 moves probabilities by up to 0.035 in PyTorch and OpenVINO alike, and PyTorch's
# abstain decisions by 1 image in 97 (EfficientNet-Lite0, hymenoptera val), so those two are recorded only.
# int8 rounds further than bf16 and passes the same gate: what moves probabilities by hundredths must not move
# the answers.
# The engines are checked on at most this many val images, evenly spread over the split's order. Their figures
# then resolve top-1 agreement to 0.05 points, ten times finer than the gate's margin, and the check costs a
# bounded time: on all 9,996 val images of a 100,000-photo run it took 163 s, as long as 16,000 backbone passes.
ENGINE_CHECK_IMAGES = 2000
GATES = {"fp32": {"min_top1_agreement": 0.995, "max_probability_difference": 0.01, "min_abstain_agreement": 0.99},
         "bf16": {"min_top1_agreement": precision.BF16_MIN_AGREEMENT},
         "int8": {"min_top1_agreement": precision.BF16_MIN_AGREEMENT}}


def backends_record(paths: RunPaths, meta: dict, state: dict[str, torch.Tensor], val_fp32: Outputs | None,
                    serve_backend: str = "auto", int8: bool = False) -> dict:
    """``metadata.json["backends"]``: writes ``model.onnx`` and checks each engine on it against the state_dict's
    fp32 outputs on the val split, ``val_fp32`` (the bf16 check's: ``jobs.parity.precision_record``).

    Runs after the trust fit: the abstain decisions compared are the served ones (``meta["trust"]``).
    ``serve_backend`` torch: neither the graph nor the check (a few seconds and the weights' size again in the
    .mar), so no engine is admitted and any later archive serves torch. ``int8``: quantize the graph too.
    """
    onnx_file = paths.model / files.ONNX
    _remove(paths.model, (files.ONNX, *files.INT8_GRAPH_FILES))  # a previous export's: other weights'
    if serve_backend == engines.TORCH:
        reason = "exported with serve_backend torch: no graph written, no engine checked"
        print(f"export: {reason}")
        return {"onnx": None, "reason": reason}
    start = time.perf_counter()
    try:
        write_onnx(models.build_model(meta, state, CPU), meta["input_size"], onnx_file)
    except Exception as e:  # noqa: BLE001 -- the tracer and the exporter raise many kinds for one unsupported op
        reason = f"{meta['arch']} does not export to ONNX ({type(e).__name__}: {_first_line(e)})"
        print(f"export: {reason}; it serves on torch only")
        return {"onnx": None, "reason": reason}
    splits = load_splits(paths)
    items = split_items(splits, "val")  # in the order of val_fp32
    names = engines.GRAPH_ENGINES if int8 else engines.ONNX_ENGINES
    picked = evenly_spread(len(items), ENGINE_CHECK_IMAGES)
    items = [items[i] for i in picked.tolist()]
    record: dict = {"onnx": files.ONNX, "val_images": len(items), "gates": GATES}
    if val_fp32 is None:
        print("export: no val images: no engine but torch is admitted")
        return {**record, **{name: {"passed": False, "reason": "no val images"} for name in names}}
    calibration = split_items(splits, "train")[:INT8_CALIBRATION_IMAGES] if int8 else []
    if int8 and not calibration:
        record[engines.OPENVINO_INT8] = {"passed": False, "reason": "no training images to calibrate on"}
    outputs, refused = _outputs_apart(onnx_file, paths.out, items, meta["preprocess"], calibration)
    record.update(refused)
    trust = Trust.from_metadata(paths.model, meta["trust"]) if meta.get("trust") else None
    reference = (val_fp32[0][picked], val_fp32[1][picked])
    figures = {key: agreement(reference, got, trust) for key, got in outputs.items()}
    for name in names:
        checked = {prec: {"passed": passes(figures[(n, prec)], GATES[prec]), **figures[(n, prec)]}
                   for n, prec in outputs if n == name}
        if checked:  # the first precision that passes serves (bf16 before fp32), else the first one's figures
            prec = next((p for p, c in checked.items() if c["passed"]), next(iter(checked)))
            record[name] = {"precision": prec, **checked[prec], "checked": checked}
            if not record[name]["passed"]:
                record[name]["reason"] = "answers differ from the state_dict's beyond the gate"
    if int8 and record[engines.OPENVINO_INT8].get("passed"):
        record[engines.OPENVINO_INT8]["calibration_images"] = len(calibration)
    else:  # a graph no engine serves is not packed
        _remove(paths.model, files.INT8_GRAPH_FILES)
    verdicts = "; ".join(f"{name} {_verdict(record[name])}" for name in names)
    print(f"export: {onnx_file.name} on {len(items)} val images against the state_dict: {verdicts} "
          f"({time.perf_counter() - start:.1f} s)")
    return record


def evenly_spread(n: int, at_most: int) -> torch.Tensor:
    """Indices of at most ``at_most`` of ``n`` items, evenly spread and in order (all of them when ``n`` is no more)."""
    if n <= at_most:
        return torch.arange(n)
    return torch.linspace(0, n - 1, at_most).round().long()


def _remove(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


def write_onnx(model: torch.nn.Module, input_size: list[int], path: Path) -> Path:
    """``model`` (a ``Classifier``) as ONNX with a dynamic batch, written atomically."""
    buffer = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and tracer warnings
        warnings.simplefilter("ignore")
        # The TorchScript exporter: it traces every torchvision and timm classifier tried here, where the
        # dynamo exporter needs onnxscript and fails on fx GraphModules (the folded backbone) more often.
        torch.onnx.export(model.cpu().eval(), (torch.zeros(1, *input_size),), buffer, dynamo=False,
                          opset_version=OPSET, input_names=[engines.ONNX_INPUT],
                          output_names=list(engines.ONNX_OUTPUTS),
                          dynamic_axes={name: batch for name in (engines.ONNX_INPUT, *engines.ONNX_OUTPUTS)})
    return atomic_write_bytes(path, buffer.getvalue())


def write_int8_graph(onnx_file: Path, root: Path, calibration: list[tuple[str, int]], preprocess: dict) -> Path:
    """``onnx_file`` quantized to int8 by NNCF's post-training quantization (weights per channel, activations'
    ranges observed on the ``calibration`` images), written beside it as ``files.INT8_GRAPH``: the .bin first,
    then the .xml renamed over, so the .xml names a whole graph. ImportError where NNCF is not installed."""
    import nncf
    import openvino

    nncf.set_log_level(logging.ERROR)  # its notes are not the job's output
    images = [x.numpy() for x, _ in make_loader(ImageFiles(root, calibration, Preprocessor(preprocess)), 1, 0)]
    with contextlib.redirect_stdout(io.StringIO()):  # nor are its progress bars (rich, on sys.stdout)
        quantized = nncf.quantize(openvino.Core().read_model(str(onnx_file)), nncf.Dataset(images),
                                  subset_size=len(images))
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=onnx_file.parent) as tmp:
        openvino.save_model(quantized, str(Path(tmp) / files.INT8_GRAPH), compress_to_fp16=False)  # float stays fp32
        for name in reversed(files.INT8_GRAPH_FILES):  # the weights first
            os.replace(Path(tmp) / name, onnx_file.parent / name)
    return onnx_file.parent / files.INT8_GRAPH


def _outputs_apart(onnx_file: Path, root: Path, items: list[tuple[str, int]], preprocess: dict,
                   calibration: list[tuple[str, int]]) -> tuple[dict[tuple[str, str], Outputs], dict[str, dict]]:
    """``engine_outputs`` in a process of its own (``python -m jobs.backends``), with this one's torch threads.

    ONNX Runtime's and OpenVINO's thread pools do not survive a fork: loaded in the job's process, they
    crashed the DataLoader workers that evaluate forks next, and with them the whole ``jobs run`` (a
    segfault, one run in two). So the job's process never loads them. A check that dies admits no engine.
    """
    with tempfile.TemporaryDirectory(prefix="jobs-engines-") as tmp:
        request, answer = Path(tmp) / "request.pt", Path(tmp) / "outputs.pt"
        torch.save({"onnx_file": str(onnx_file), "root": str(root), "items": items, "preprocess": preprocess,
                    "calibration": calibration, "threads": torch.get_num_threads()}, request)
        source = str(Path(__file__).resolve().parents[1])  # where the jobs package is, wherever the job runs
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-m", "jobs.backends", str(request), str(answer)], env=env,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1][:200]
            reason = f"the check's process exited {done.returncode} ({last})"
            return {}, {name: {"passed": False, "reason": reason} for name in engines.GRAPH_ENGINES}
        result = torch.load(answer, weights_only=True)
    return result["outputs"], result["refused"]


def engine_outputs(onnx_file: Path, root: Path, items: list[tuple[str, int]], preprocess: dict,
                   calibration: list[tuple[str, int]]) -> tuple[dict[tuple[str, str], Outputs], dict[str, dict]]:
    """({(engine, precision): (features, logits)} of every engine that loads on ``items``, decoded once for all
    of them, in the order given; {engine: record} of those that cannot load here). ``calibration``: the
    training images that quantize the graph to int8 (none: not asked for)."""
    int8_graph, refused = None, {}
    if calibration:
        start = time.perf_counter()
        try:
            int8_graph = write_int8_graph(onnx_file, root, calibration, preprocess)
            print(f"export: {files.INT8_GRAPH} quantized on {len(calibration)} training images "
                  f"({time.perf_counter() - start:.1f} s)")
        except Exception as e:  # noqa: BLE001 -- NNCF not installed, or a graph it cannot quantize
            refused[engines.OPENVINO_INT8] = {"passed": False,
                                              "reason": f"not quantized ({type(e).__name__}: {_first_line(e)})"}
    candidates, cannot_load = _candidates(onnx_file, int8_graph)
    refused.update(cannot_load)
    loader = make_loader(ImageFiles(root, items, Preprocessor(preprocess)), 32, 0)
    rows = {key: Rows(len(items)) for key in candidates}
    for x, _ in loader:
        for key, engine in candidates.items():
            rows[key].add(*engine.run(x))
    return {key: got.result() for key, got in rows.items()}, refused


def _candidates(onnx_file: Path, int8_graph: Path | None
                ) -> tuple[dict[tuple[str, str], engines.Engine], dict[str, dict]]:
    """({(engine, precision): engine} to check, {engine: record} of those that cannot load here).

    OpenVINO is checked in its bf16 where this CPU has it (its own default there) and in fp32; the int8 graph
    as it serves, its float layers in bf16 where the CPU has it.
    """
    threads, native = torch.get_num_threads(), precision.native_bf16(CPU)
    wanted = [(engines.ONNXRUNTIME, "fp32", onnx_file, False),
              *([(engines.OPENVINO, "bf16", onnx_file, True)] if native else []),
              (engines.OPENVINO, "fp32", onnx_file, False),
              *([(engines.OPENVINO_INT8, "int8", int8_graph, native)] if int8_graph else [])]
    loaded, refused = {}, {}
    for name, prec, graph, bf16 in wanted:
        try:
            loaded[(name, prec)] = engines.graph_engine(name, graph, threads, bf16)
        except Exception as e:  # noqa: BLE001 -- not installed, or it cannot read the graph
            refused[name] = {"passed": False, "reason": f"did not load ({type(e).__name__}: {_first_line(e)})"}
    return loaded, refused


def agreement(reference: Outputs, got: Outputs, trust: Trust | None) -> dict:
    """Top-1 agreement, the largest probability difference and the share of equal abstain decisions."""
    (ref_p, ref_abstain), (p, abstain) = (_answers(*outputs, trust) for outputs in (reference, got))
    return {"top1_agreement": round(float((ref_p.argmax(1) == p.argmax(1)).float().mean()), 4),
            "max_probability_difference": round(float((ref_p - p).abs().max()), 6),
            "abstain_agreement": round(float((ref_abstain == abstain).float().mean()), 4)}


def passes(figures: dict, gate: dict) -> bool:
    """``figures`` (``agreement``) within ``gate`` (one of ``GATES``; a bound it does not name holds)."""
    return (figures["top1_agreement"] >= gate["min_top1_agreement"]
            and figures["max_probability_difference"] <= gate.get("max_probability_difference", float("inf"))
            and figures["abstain_agreement"] >= gate.get("min_abstain_agreement", 0.0))


def _answers(features: torch.Tensor, logits: torch.Tensor, trust: Trust | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(served probabilities, abstain decisions): calibrated with the trust fields, plain softmax without."""
    if trust is None:
        return logits.softmax(1), torch.zeros(len(logits), dtype=torch.bool)
    probs, fields = trust.assess(features, logits)
    return probs, torch.tensor([f["abstain"] for f in fields], dtype=torch.bool)


def _verdict(record: dict) -> str:
    if "precision" not in record:
        return f"not admitted ({record['reason']})"
    return (f"{'admitted' if record['passed'] else 'not admitted'} in {record['precision']} (top-1 "
            f"{record['top1_agreement']:.4f}, probabilities within {record['max_probability_difference']:.4f}, "
            f"abstain {record['abstain_agreement']:.4f})")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


if __name__ == "__main__":  # _outputs_apart's process: request.pt in, outputs.pt out
    asked = torch.load(sys.argv[1], weights_only=True)
    torch.set_num_threads(asked["threads"])
    found, cannot = engine_outputs(Path(asked["onnx_file"]), Path(asked["root"]), asked["items"], asked["preprocess"],
                                   asked["calibration"])
    torch.save({"outputs": found, "refused": cannot}, sys.argv[2])
    exit_process(0)
