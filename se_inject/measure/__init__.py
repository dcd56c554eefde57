"""Measuring what a retrofit costs on real hardware: timing against the original and a twin (bench), candidates side by side (compare)."""
