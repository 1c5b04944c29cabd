"""edge-fleet agent: serves ML models on an edge device and keeps them up to date."""

__version__ = "0.1.0"
