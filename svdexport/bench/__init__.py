"""Measurements: ratios taken side by side in one process, never absolute-time assertions."""
