"""SOURCE -> shards -> image refs: what a run finds to label."""
