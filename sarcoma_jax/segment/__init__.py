"""Supervised segmentation: the pure steps (steps.py) and the training loop (train.py)."""
