"""The training machinery every stage shares, one file per job (see README, Layout)."""
