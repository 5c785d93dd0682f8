"""SDPG — Self-Distilled Policy Gradient on Megatron-Core."""

__version__ = "0.1.0"
