"""Search terms or an image folder in, a served image classifier out. Run as ``python -m jobs`` (or the
``jobs`` console script); from Python, ``jobs.api`` has every stage as a function."""

__version__ = "0.1.0"
