"""The TorchServe side: our image-classifier handler (``resnet_handler.py``) and the server
configuration (``config.properties``). ``jobs archive`` packs the handler with ``jobs/presets.py``
into the .mar; ``jobs serve``, the serve container and the tests read ``config.properties``.
"""
