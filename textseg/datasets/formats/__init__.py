"""One writer per export format (`textseg.datasets.export.FORMATS`)."""
