"""OAL: outlier-aware learning for OOD detection, as a plain PyTorch library (no Ray here)."""

__version__ = "0.1.0"
