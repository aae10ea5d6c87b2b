"""Training: the recipe's building blocks (DeepSpeed configuration, learning-rate schedule, ...)."""
