"""mcad: multi-teacher cross-modal alignment distillation to on-device retrieval."""
__version__ = "0.1.0"
