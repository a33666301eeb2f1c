"""Search terms or an image folder in, a served image classifier out. Run as ``python -m jobs``."""

__version__ = "0.1.0"
