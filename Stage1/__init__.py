"""Stage 1: align the vision tower with the LM by training only the MLP projector on captions."""
