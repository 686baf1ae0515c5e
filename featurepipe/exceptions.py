"""One exception root for featurepipe.

Every error the library raises on purpose derives from :class:`FeaturePipeError`, so the CLI can
catch it and print one clear line. Each specific error also subclasses the builtin a Python user
would expect (``ValueError``, ``OSError``, ``ImportError`` ...), so ``except ValueError`` keeps
working.
"""

from __future__ import annotations

__all__ = [
    "BackboneError",
    "ConfigError",
    "DecodeError",
    "FeaturePipeError",
    "FeaturePipeWarning",
    "MissingDependencyError",
    "SourceError",
    "SpecMismatchError",
    "StoreError",
    "StoreLockedError",
    "WorkerError",
    "WriteError",
]


class FeaturePipeError(Exception):
    """Root of all featurepipe errors."""


class ConfigError(FeaturePipeError, ValueError):
    """A parameter or option has a value featurepipe cannot use."""


class SourceError(FeaturePipeError, ValueError):
    """An image source cannot be read: missing path, empty folder, bad manifest or IDX file."""


class DecodeError(FeaturePipeError, OSError):
    """One image cannot be decoded. ``path`` names the file, ``reason`` says why (short, stable)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class BackboneError(FeaturePipeError, ValueError):
    """Unknown backbone name, unavailable weights, or an unknown layer."""


class StoreError(FeaturePipeError, OSError):
    """A feature store is missing, unreadable, or does not hold what was asked for."""


class StoreLockedError(StoreError, TimeoutError):
    """Another process is writing the same feature store."""


class WriteError(FeaturePipeError, OSError):
    """A file could not be written (full disk, no permission); the message names the path.

    ``errno`` is the failed call's and ``strerror`` the reason alone, so ``except OSError`` code
    that looks at them keeps working; ``str()`` is the one-line message.
    """

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None,
                 filename: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __str__(self) -> str:
        return self.message


class WorkerError(FeaturePipeError, RuntimeError):
    """Decode worker processes died, or no batch came from them within the time allowed."""


class SpecMismatchError(FeaturePipeError, ValueError):
    """Features or a model were made with another backbone / layer / preprocessing spec."""


class MissingDependencyError(FeaturePipeError, ImportError):
    """An optional dependency is not installed; the message names the install command."""


class FeaturePipeWarning(UserWarning):
    """Something was adjusted or skipped on the user's behalf (CV folds reduced, files skipped)."""
