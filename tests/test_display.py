"""Hostile names in human output, and a hostile folder end to end: embed, inspect, predict."""

from __future__ import annotations

import os

import pytest

from featurepipe.cli import main
from featurepipe.display import escape
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images

ENGINE = ["--backbone", TINY["backbone"], "--weights", TINY["weights"], "--image-size",
          str(TINY["image_size"]), "--precision", "fp32", "--workers", "0"]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("raw", "shown"), [
    ("cat/a b.jpg", "cat/a b.jpg"),
    ("ünïcode/日本.png", "ünïcode/日本.png"),
    ("x\nskipped y.jpg: forged", "x\\nskipped y.jpg: forged"),
    ("tab\there\rcr", "tab\\there\\rcr"),
    ("esc\x1b[2Jbell\x07", "esc\\x1b[2Jbell\\x07"),
    ("rtl\u202eevil", "rtl\\u202eevil"),
    (os.fsdecode(b"caf\xe9.jpg"), "caf\\xe9.jpg"),
    ("back\\slash", "back\\slash"),
])
def test_escape_keeps_one_line_per_item(raw, shown):
    assert escape(raw) == shown
    assert escape(raw).isprintable()
    escape(raw).encode("utf-8")


def test_escape_takes_paths_and_objects(tmp_path):
    assert escape(tmp_path / "a\nb.jpg") == f"{tmp_path}/a\\nb.jpg"
    assert escape(b"caf\xe9") == "caf\\xe9"
    assert escape(ValueError("bad\nline")) == "bad\\nline"


@pytest.mark.timeout(300)
def test_hostile_folder_embeds_and_reports_one_line_per_bad_file(tmp_path, capsys):
    root = tmp_path / "photos"
    write_good_images(root / "cat", 3, seed=1)
    write_good_images(root / "dog", 3, seed=2)
    (root / "cat" / "zero\n  skipped forged.jpg: planted.jpg").write_bytes(b"")
    os.mkfifo(root / "cat" / "pipe.jpg")
    os.symlink("l2.jpg", root / "dog" / "l1.jpg")
    os.symlink("l1.jpg", root / "dog" / "l2.jpg")
    good = os.path.join(os.fsencode(root / "dog"), b"caf\xe9.jpg")
    os.link(os.path.join(os.fsencode(root / "dog"), b"img_000.jpg"), good)
    store = tmp_path / "s.h5"

    code, out, err = run(capsys, "embed", root, "--out", store, *ENGINE)
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("  skipped ")]
    assert skipped == [
        "  skipped cat/pipe.jpg: not a regular file",
        "  skipped cat/zero\\n  skipped forged.jpg: planted.jpg: empty file",
        "  skipped dog/l1.jpg: symlink loop",
        "  skipped dog/l2.jpg: symlink loop",
    ]
    ids = FeatureStore(store).load().ids
    assert "dog/caf\\xe9.jpg" in ids and len(ids) == 7  # the non-UTF-8 name is embedded

    code, out, _ = run(capsys, "inspect", store)
    assert code == 0
    assert "    cat/zero\\n  skipped forged.jpg: planted.jpg: empty file" in out.splitlines()
    assert not any("forged" in line and "zero" not in line for line in out.splitlines())


@pytest.mark.timeout(300)
def test_predict_skips_an_empty_folder_and_a_fifo(tmp_path, capsys):
    root = tmp_path / "photos"
    write_good_images(root / "a", 4, seed=3)
    write_good_images(root / "b", 4, seed=4)
    store, model = tmp_path / "s.h5", tmp_path / "m.joblib"
    assert run(capsys, "embed", root, "--out", store, *ENGINE, "--quiet")[0] == 0
    assert run(capsys, "fit", store, "--head", "knn", "--cv", "2", "--out", model)[0] == 0
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    code, out, err = run(capsys, "predict", model, tmp_path / "empty", root / "a",
                         tmp_path / "pipe.jpg", "--workers", "0")
    assert code == 0, err
    assert f"warning: skipped {tmp_path / 'empty'}: no images found" in err
    assert f"skipped {tmp_path / 'pipe.jpg'}: not a regular file" in out
    assert sum("img_00" in line for line in out.splitlines()) == 4


@pytest.mark.timeout(300)
def test_embedder_cache_takes_a_name_that_is_not_utf8(tmp_path):
    from featurepipe import ImageEmbedder

    folder = os.fsencode(tmp_path)
    write_good_images(tmp_path / "x", 1, seed=5)
    os.rename(os.fsencode(tmp_path / "x" / "img_000.jpg"), os.path.join(folder, b"caf\xe9.jpg"))
    path = os.fsdecode(os.path.join(folder, b"caf\xe9.jpg"))
    embedder = ImageEmbedder(TINY["backbone"], weights=TINY["weights"],
                             image_size=TINY["image_size"], precision="fp32", workers=0,
                             cache=tmp_path / "cache.h5")
    first = embedder.fit_transform([path])
    assert first.shape[0] == 1
    again = ImageEmbedder(TINY["backbone"], weights=TINY["weights"],
                          image_size=TINY["image_size"], precision="fp32", workers=0,
                          cache=tmp_path / "cache.h5").fit_transform([path])
    assert (again == first).all()
    assert FeatureStore(tmp_path / "cache.h5").load().ids == [f"{tmp_path}/caf\\xe9.jpg"]


def test_embedding_a_path_list_with_a_repeat_fails_before_any_work(tmp_path):
    from featurepipe.embed import embed
    from featurepipe.exceptions import SourceError

    a, b = write_good_images(tmp_path / "x", 2, seed=6)
    store = tmp_path / "s.h5"
    with pytest.raises(SourceError, match=r"img_000\.jpg is listed twice \(items 0 and 2\)"):
        embed([str(a), str(b), str(a)], store, **TINY, precision="fp32", workers=0,
              progress=False)
    assert not store.exists()  # refused before a store, a shard or a forward pass
