"""textseg: distributed batch auto-labeling with text-prompted segmentation models over Ray Data."""

__version__ = "0.1.0"
