"""Engines move messages between the server and the clients; the round logic lives in ``fedslip.api``."""
