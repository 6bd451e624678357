"""Architectures, datasets, augmentation, training and checkpoints."""
