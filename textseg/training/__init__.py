"""Training textseg's own fusion model: synthetic tiles with exact ground truth, datasets, the trainer."""
