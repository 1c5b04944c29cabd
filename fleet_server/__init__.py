"""edge-fleet server: devices, signed model releases, rollouts and the dashboard."""

__version__ = "0.1.0"
