"""The per-image path: decode -> model -> write stages, and the assembly of windowed scenes."""
