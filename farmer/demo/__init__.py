"""``farmer demo``: a local web page to sample from a checkpoint, score images by exact likelihood, and read
the model card. Standard library HTTP only (see README, "Demo"); nothing to install beyond the package."""

from farmer.demo.app import ApiError, DemoApp, Limits
from farmer.demo.server import make_server, serve

__all__ = ["ApiError", "DemoApp", "Limits", "make_server", "serve"]
