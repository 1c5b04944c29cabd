"""The device side of OTA updates: verification of signed metadata, the update machine."""
