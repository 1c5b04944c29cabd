"""End-to-end tests with real processes: ``edge-fleet serve``, Mosquitto, ``edge-agent run``."""
