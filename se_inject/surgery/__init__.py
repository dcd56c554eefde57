"""Carrying out a plan: the rewritten model (units inserted) and the overhead report (Eq. 5, FLOPs)."""
