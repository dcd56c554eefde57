"""What the units learned: excitation statistics, plots, and pruning of constant gates."""
