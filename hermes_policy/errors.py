"""User-facing errors.

Every error a user can cause (bad video, bad model, bad policy, bad stream call) is a
subclass of :class:`HermesError` with a one-line message that names the offending input.
The CLI prints that line and exits non-zero; it never prints a traceback for these.
"""

from __future__ import annotations


class HermesError(Exception):
    """Base class of every error caused by user input."""


class VideoInputError(HermesError):
    """A video file or frame folder cannot be read (missing, corrupt, empty, unsupported)."""


class ModelLoadError(HermesError):
    """A model cannot be loaded or is of an unsupported architecture."""


class StreamError(HermesError):
    """A streaming session was used in a way that cannot work (e.g. a question before any frame)."""


class RetentionError(HermesError):
    """A retention rule was configured with impossible parameters."""


class PolicyError(HermesError):
    """A policy JSON is malformed, of another schema, or does not fit the model."""


class OutputError(HermesError):
    """An output path cannot be written (read-only, a file where a folder is needed, ...)."""
