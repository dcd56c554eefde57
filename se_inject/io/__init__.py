"""Data in and out: model specifications, checkpoints, recipes, and files written safely."""
