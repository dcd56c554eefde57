"""Fine-tuning a retrofitted model: datasets and the training loop with checkpoints and resume."""
