"""Training: losses and weightings (``losses.py``); the trainer, checkpoints and recipes follow."""
