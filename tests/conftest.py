"""Shared fixtures: real image files of every awkward kind, made on the fly, and a tiny backbone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, write_good_images, write_odd_images


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """Two classes of good images plus odd and broken files in class 'b'."""
    root = tmp_path / "photos"
    write_good_images(root / "a", 6, seed=10)
    write_good_images(root / "b", 4, seed=11)
    odd = write_odd_images(root / "b", seed=12)
    expected = {f"a/img_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}": None for i in range(6)}
    expected.update({f"b/img_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}": None for i in range(4)})
    expected.update({f"b/{name}": why for name, why in odd.items()})
    return root, expected


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
