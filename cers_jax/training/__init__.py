"""Train state, jitted steps, losses, checkpoints and the training loop."""
