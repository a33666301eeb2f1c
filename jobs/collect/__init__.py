"""The collect stage: image search terms -> ``raw/<term>/`` images with a manifest and attribution.

``collect(cfg, paths)`` is the entry point; ``contact_sheet`` is shared with the report stage.
"""

from .preview import contact_sheet
from .stage import collect

__all__ = ["collect", "contact_sheet"]
