"""One image's bytes -> model-size pixels (CPU tasks; no torch)."""
