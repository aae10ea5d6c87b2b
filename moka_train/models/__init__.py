"""The multimodal model: frozen encoders, projectors, the backbone with adapters."""
