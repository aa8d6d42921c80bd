"""The driver: plan a run, run it (on Ray or in this process), close it."""
