"""Hub weights offline: one line naming the fix, at once, without retries or network in tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import featurepipe.backbones._hub as hub
from featurepipe.backbones import load_backbone
from featurepipe.cli import main
from featurepipe.exceptions import BackboneError

NAME = "timm:resnet18"


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """timm.create_model records the offline flag it ran under instead of building anything."""
    import timm
    from huggingface_hub import constants

    calls: list[bool] = []

    def fake_create_model(*args: object, **kwargs: object) -> None:
        calls.append(bool(constants.HF_HUB_OFFLINE))
        raise RuntimeError("stop here: the test only checks what happens before the build")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    monkeypatch.setattr(hub, "timm_cached_file", lambda cfg: None)
    return calls


def _no_probe(*args: object, **kwargs: object) -> None:
    raise AssertionError("the hub was asked although HF_HUB_OFFLINE is set")


def test_offline_env_fails_before_any_request(monkeypatch: pytest.MonkeyPatch,
                                              no_build: list[bool]) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", _no_probe)
    with pytest.raises(BackboneError) as info:
        load_backbone(NAME)
    text = str(info.value)
    assert "\n" not in text and "--weights FILE" in text and "'efficientnet_lite0'" in text
    assert "HF_HUB_OFFLINE" in text and no_build == []


def test_unreachable_hub_is_asked_once_without_retries(monkeypatch: pytest.MonkeyPatch,
                                                       no_build: list[bool]) -> None:
    import httpx2 as httpx
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked: list[tuple[str, float]] = []

    def unreachable(url: str, timeout: float = 0.0, **kw: object) -> None:
        asked.append((url, timeout))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(BackboneError, match=r"cannot be reached \(ConnectError") as info:
        load_backbone(NAME)
    assert "\n" not in str(info.value) and "--weights FILE" in str(info.value)
    assert len(asked) == 1 and asked[0][1] == hub.PROBE_TIMEOUT and "resnet18" in asked[0][0]
    assert no_build == []


def test_reachable_hub_goes_on_to_download(monkeypatch: pytest.MonkeyPatch,
                                           no_build: list[bool]) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kw: None)
    with pytest.raises(BackboneError, match="stop here"):
        load_backbone(NAME)
    assert no_build == [False]  # the real download path, with the hub's own retries


def test_cached_weights_load_without_asking_the_hub(monkeypatch: pytest.MonkeyPatch,
                                                    no_build: list[bool]) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "timm_cached_file", lambda cfg: "/cache/model.safetensors")
    with pytest.raises(BackboneError, match="stop here"):
        with hub.hub_fast_fail(hub.BackboneSpec(NAME)):
            import timm

            try:
                timm.create_model("resnet18", pretrained=True)
            except RuntimeError as exc:
                raise BackboneError(str(exc)) from exc
    assert no_build == [True] and constants.HF_HUB_OFFLINE is False


def test_cli_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_build: list[bool],
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tests.helpers import write_good_images

    write_good_images(tmp_path / "a" / "x", 2, seed=0)
    assert main(["embed", str(tmp_path / "a"), "--out", str(tmp_path / "s.h5"),
                 "--backbone", NAME, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("featurepipe: error: timm:resnet18 pretrained weights needs a download")
