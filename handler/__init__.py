"""The TorchServe side: our image-classifier handler (``classifier_handler.py``), the server
configuration (``config.properties``) and the metrics it exposes (``metrics.yaml``). ``jobs archive``
packs the handler with ``jobs/contract.py`` and ``jobs/presets.py`` into the .mar; ``jobs serve``,
the serve container and the tests read ``config.properties``.
"""
