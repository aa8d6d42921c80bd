"""What lands in DEST: masks, metadata rows and parts, the state, the Ray datasink."""
