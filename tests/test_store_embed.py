"""The feature store's guarantees seen through ``featurepipe embed`` (see docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featurepipe.backbones import load_backbone, resolve_spec
from featurepipe.cli import main
from featurepipe.embed import embed
from featurepipe.embedding import refuse_other_specs
from featurepipe.exceptions import SpecMismatchError, StoreError
from featurepipe.store import FeatureStore
from tests.helpers import TINY, write_good_images
from tests.test_cli import TINY_ARGS


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _folder(root: Path, n: int, seed: int) -> Path:
    write_good_images(root / "x", n, seed=seed)
    write_good_images(root / "y", n, seed=seed + 1)
    return root


def test_second_folder_into_one_store_never_drops_the_first(tmp_path, capsys):
    first, second = _folder(tmp_path / "first", 3, 1), _folder(tmp_path / "second", 2, 5)
    store = str(tmp_path / "s.h5")
    assert _run(capsys, "embed", str(first), "--out", store, *TINY_ARGS)[0] == 0
    code, _, err = _run(capsys, "embed", str(second), "--out", store, *TINY_ARGS)
    assert code == 1 and err.count("\n") == 1, err
    assert "6 row(s) from folder:" + str(first.resolve()) in err
    assert str(second.resolve()) in err and "--replace" in err
    assert FeatureStore(store).info()["n_rows"] == 6  # the first folder's rows survived

    (first / "x" / "img_000.jpg").unlink()  # the same folder, shrunk: deleted files go
    code, out, _ = _run(capsys, "embed", str(first), "--out", store, *TINY_ARGS, "--json")
    assert code == 0 and (json.loads(out)["n_dropped"], json.loads(out)["n_rows"]) == (1, 5)

    code, out, _ = _run(
        capsys, "embed", str(second), "--out", store, *TINY_ARGS, "--replace", "--json"
    )
    assert code == 0 and json.loads(out)["n_rows"] == 4  # 2 ids dropped, 3 re-embedded
    assert FeatureStore(store).attrs()["source"] == "folder:" + str(second.resolve())


@pytest.mark.parametrize("damage", ["truncated", "header zeroed"])
def test_embed_replace_rebuilds_a_damaged_store(tmp_path, capsys, damage):
    root, store = _folder(tmp_path / "photos", 2, 1), tmp_path / "s.h5"
    assert _run(capsys, "embed", str(root), "--out", str(store), *TINY_ARGS)[0] == 0
    data = store.read_bytes()
    damaged = data[: len(data) // 3] if damage == "truncated" else bytes(2048) + data[2048:]
    store.write_bytes(damaged)
    code, _, err = _run(capsys, "embed", str(root), "--out", str(store), *TINY_ARGS)
    assert code == 1 and "damaged featurepipe store" in err and "--replace" in err
    code, out, _ = _run(
        capsys, "embed", str(root), "--out", str(store), *TINY_ARGS, "--replace", "--json"
    )
    assert code == 0 and json.loads(out)["n_rows"] == 4
    assert len(FeatureStore(store).load().ids) == 4


def test_unwritable_out_fails_at_once_in_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "photos", 1, 1)
    (tmp_path / "a-file").write_text("x")
    places = [str(tmp_path / "a-file" / "s.h5")]
    if Path("/proc/self").is_dir():
        places.append("/proc/featurepipe-test.h5")
    for out in places:  # the lock timeout would turn a wait into "still being written"
        code, _, err = _run(
            capsys, "embed", str(root), "--out", out, *TINY_ARGS, "--lock-timeout", "3"
        )
        # The CLI checks --out before any work; the store's own check (below the CLI) is
        # tested in test_store.py. Either way: one line naming the place, never a wait.
        assert code == 1 and err.count("\n") == 1 and str(Path(out).parent) in err, err
        assert "another process" not in err


def test_nan_weights_give_skipped_rows_not_nan_features(tmp_path):
    root = _folder(tmp_path / "photos", 2, 1)
    backbone = load_backbone(
        resolve_spec(TINY["backbone"], weights="random", image_size=TINY["image_size"])
    )
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.fill_(float("nan"))
    report = embed(
        root,
        tmp_path / "s.h5",
        **TINY,
        precision="fp32",
        progress=False,
        workers=0,
        loaded_backbone=backbone,
    )
    assert (report.n_rows, report.n_skipped) == (0, 4)
    assert {reason for _, reason in report.skipped} == {"non-finite features"}


def test_spec_refusal_names_what_differs_from_the_closest_entry(tmp_path):
    store = FeatureStore(tmp_path / "s.h5")
    wanted = {"backbone": "net", "layer": None, "precision": "bf16", "spec": {"name": "net"}}
    far = {
        **wanted,
        "backbone": "other",
        "layer": "l1",
        "precision": "fp32",
        "spec": {"name": "other"},
    }
    near = {**wanted, "precision": "fp32"}
    for key, attrs in (("0000000000000000", far), ("ffffffffffffffff", near)):
        with store.writer(key, {"dtype": "float32", **attrs}) as w:  # far comes first by key
            w.write_shard("s", ["a"], ["1"], np.ones((1, 2), np.float32))
            w.commit([("a", "1", -1)], [])
    with pytest.raises(SpecMismatchError, match=r"differs in: precision\)"):
        refuse_other_specs(store, "1111111111111111", wanted)


def test_fit_on_an_old_store_with_nan_rows_names_store_entry_and_rows(tmp_path, capsys):
    root, store = _folder(tmp_path / "photos", 3, 1), tmp_path / "s.h5"
    assert _run(capsys, "embed", str(root), "--out", str(store), *TINY_ARGS)[0] == 0
    key = FeatureStore(store).resolve_key()
    with h5py.File(store, "r+") as f:  # as a store written before embedding skipped NaN rows
        f[f"entries/{key}/features"][2, :] = np.nan
    code, _, err = _run(capsys, "fit", str(store), "--out", str(tmp_path / "m.joblib"))
    assert code == 1 and err.count("\n") == 1, err
    assert str(store) in err and key in err and "non-finite" in err and "'x/img_002.jpg'" in err


def test_embed_that_cannot_fit_fails_before_computing(tmp_path, monkeypatch):
    import featurepipe.store as store_mod

    root, store = _folder(tmp_path / "photos", 2, 1), tmp_path / "s.h5"
    usage = store_mod.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(StoreError, match="no space left on device"):
        embed(root, store, **TINY, precision="fp32", progress=False, workers=0)
    assert not FeatureStore(store).parts_path.exists() and not store.exists()
