"""Scores -> labels, and what is derived from them (polygons)."""
