"""The public API: every name in __all__ resolves, and importing featurepipe stays light."""

from __future__ import annotations

import subprocess
import sys

import featurepipe


def test_every_public_name_resolves():
    assert featurepipe.__all__ == sorted(featurepipe.__all__)
    for name in featurepipe.__all__:
        assert getattr(featurepipe, name) is not None, name


def test_import_does_not_pull_in_torch():
    code = "import sys, featurepipe, featurepipe.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute_is_an_attribute_error():
    try:
        featurepipe.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_public_names_never_shadow_submodules():
    import importlib
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(featurepipe.__path__)}
    assert not submodules & set(featurepipe.__all__)
    engine = importlib.import_module("featurepipe.embed")
    assert featurepipe.embed is engine
