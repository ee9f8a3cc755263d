"""Serving's errors, in bnexport's one hierarchy (the CLI prints one line and exits 2)."""

from __future__ import annotations

from bnexport.errors import BnexportError


class RepositoryError(BnexportError):
    """A model repository cannot be written or read: an existing model folder without
    ``--force``, a config Triton would refuse, or a folder that is no model repository."""


class ServeError(BnexportError):
    """A server cannot start: a port is taken, the serve extra is missing, a model fails to load."""


class EndpointError(BnexportError):
    """A live endpoint cannot be used: it is down, slow past the timeout, or lacks the model."""


def serve_extra_missing(what: str, exc: ImportError) -> ServeError:
    """The error for a missing optional dependency of the serve extra."""
    return ServeError(
        f"{what} needs the serve extra ({exc.name or exc}): pip install 'bnexport[serve]'"
    )
