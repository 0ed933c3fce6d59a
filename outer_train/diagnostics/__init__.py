"""Diagnostics of the inner-training map and of meta-loss slices: roughness, Jacobians."""
