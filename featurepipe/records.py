"""Plain records shared by the engine, the estimators and the CLI."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SkippedFile"]


class SkippedFile(NamedTuple):
    """A file that could not be embedded: its id (path or array row) and why.

    A tuple, so ``for id_, reason in report.skipped`` and ``dict(report.skipped)`` work.
    """

    id: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"id": ..., "reason": ...}``, the form JSON reports and the store use."""
        return {"id": self.id, "reason": self.reason}
