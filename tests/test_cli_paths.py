"""Output paths are checked before any work: one line naming the path, exit 1, nothing computed."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurepipe.cli import main
from featurepipe.cli_common import check_output
from featurepipe.exceptions import ConfigError
from tests.helpers import TINY, write_good_images

TINY_ARGS = ["--weights", TINY["weights"], "--image-size", str(TINY["image_size"])]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    write_good_images(tmp_path / "photos" / "a", 3, seed=0)
    write_good_images(tmp_path / "photos" / "b", 3, seed=1)
    return tmp_path / "photos"


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.txt"
    path.write_text("not a folder")
    return path


def _fails_at_once(argv: list[str], capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch, needle: str) -> None:
    """The command ends with one error line before any backbone is loaded."""
    import featurepipe.backbones as backbones

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(backbones, "load_backbone", no_work)
    monkeypatch.setattr(backbones, "describe_backbone", no_work)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("featurepipe: error: --out ") and needle in err


def test_embed_out_under_a_file(photos: Path, a_file: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    _fails_at_once(["embed", str(photos), "--out", str(a_file / "sub" / "s.h5"), "--quiet",
                    "--backbone", TINY["backbone"], *TINY_ARGS], capsys, monkeypatch,
                   "is not a folder")


def test_embed_out_where_nothing_can_be_created(photos: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, a folder where no file can be created even by root")
    _fails_at_once(["embed", str(photos), "--out", "/proc/x.h5", "--quiet", "--lock-timeout",
                    "3600"], capsys, monkeypatch, "cannot write in /proc")


def test_finetune_and_compare_out_under_a_file(photos: Path, a_file: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = str(a_file / "run")
    _fails_at_once(["finetune", str(photos), "--out", out, "--quiet", "--backbone",
                    TINY["backbone"], *TINY_ARGS], capsys, monkeypatch, "is not a folder")
    _fails_at_once(["compare", str(photos), "--out", out, "--quiet", "--backbones",
                    TINY["backbone"], *TINY_ARGS], capsys, monkeypatch, "is not a folder")


def test_check_output_accepts_new_files_and_folders(tmp_path: Path, a_file: Path) -> None:
    check_output(tmp_path / "s.h5")
    check_output(tmp_path / "new" / "s.h5")  # the commands create missing folders
    check_output(tmp_path / "new" / "deeper", folder=True)
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(tmp_path)
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_output(a_file, folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]  # no probe left behind
