"""SeedVR2 one-step video and image restoration, and its RunPod worker."""

__version__ = "0.1.0"
