"""One module per adapter method family; each registers its classes with ``register_method``."""
