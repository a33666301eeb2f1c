"""The serving package: everything needed to answer for an exported model, and nothing of training.

``jobs archive`` packs this package whole into the .mar, and training imports the shared parts from
here, so what the job evaluated is what the server runs. It never imports ``jobs`` (a test checks).

- ``files``: the model folder's file names (``model.pt``, ``metadata.json``, ``model.onnx``, ...)
- ``model``: models by name (torchvision or ``timm/<name>``), the served model built from ``metadata.json``
- ``preprocess``: decoding and the transforms, from the spec ``metadata.json`` records
- ``precision``: bf16 where the hardware has it and the export allowed it
- ``engines``: what runs the model (PyTorch, ONNX Runtime, OpenVINO) behind one interface, chosen per machine
- ``service``: ``ImageClassifier``, bytes in, calibrated answers with the trust fields out
- ``protocol``: request bodies and answer bodies (raw, multipart, JSON, KServe v1/v2)
- ``scheduler`` and ``cpus``: workers, threads and batching for the machine that serves
- ``answer_metrics``: Prometheus metrics of the answers (by class, abstentions, score histograms), both runtimes
- ``capture``: keeps what the server met (opt-in: ``JOBS_CAPTURE_DIR``); ``observe``: metrics and capture per answer
- ``classifier_handler``: TorchServe's entry point; ``config.properties`` and ``metrics.yaml`` its settings
- ``kserve_runtime``: the second runtime, KServe's model server on the same archives (docs/serving-runtimes.md)
- ``triton_backend``: Triton's Python pre- and post-processing steps around ``model.onnx`` (``jobs export-triton``)
"""
