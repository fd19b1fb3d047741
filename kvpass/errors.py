"""Exceptions kvpass raises, so callers can catch kvpass failures apart from their own."""


class KVPassError(Exception):
    """Base class of every error kvpass raises on purpose."""


class CaptureError(KVPassError, ValueError):
    """The model could not be captured as a graph from the given example inputs."""


class UnsupportedModelError(KVPassError, NotImplementedError):
    """The model was captured, but kvpass cannot rewrite what it found."""
