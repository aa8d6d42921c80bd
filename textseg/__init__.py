"""textseg: distributed batch auto-labeling with text-prompted segmentation models over Ray Data.

`textseg.label(source, dest, prompts=...)` runs a labeling job from Python; `textseg label` is the CLI.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def label(source: str, dest: str, **options: Any) -> Any:
    """See `textseg.api.label` (imported lazily: `import textseg` stays light)."""
    from textseg.api import label as _label

    return _label(source, dest, **options)
