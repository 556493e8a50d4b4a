"""Producer side of diffgentor: the typed Python client and the `diffgentor` CLI (no torch here)."""

from api_client.client import DiffgentorClient, SubmittedJob

__all__ = ["DiffgentorClient", "SubmittedJob"]
