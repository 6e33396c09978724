"""Evaluation views: which of a client's tracks is evaluated, on which rows.

A module of its own, below both ``client`` (which evaluates a view) and ``engines`` (which carry views to
the clients), so that neither imports the other for a type (``tests/test_architecture.py``).
"""

from __future__ import annotations

View = tuple[str, ...] | None  # tracks to evaluate; None = the client's inference model
# The client's inference model on the balanced global test set instead of its own rows: what
# personalization costs a client on inputs outside its own distribution.
GLOBAL_TEST_VIEW: View = ("global_test",)
# Partial sharing: the shared parts with the local parts at their initial values (the server's model, the
# one global accuracy measures) on the client's own rows: the global track alone for these methods.
SERVER_MODEL_VIEW: View = ("server_model",)
