"""Feature identity: entry keys of existing stores never change; one spec comparison."""

from __future__ import annotations

import pytest

from featurepipe.backbones import describe_backbone, resolve_spec
from featurepipe.decode import DecodePolicy
from featurepipe.embedding import canonical_spec
from featurepipe.exceptions import SpecMismatchError
from featurepipe.identity import (
    check_same_spec,
    closest_entry,
    entry_key,
    key_parts,
)

#: Keys computed with featurepipe at commit 8697d76 (before identity.py existed). Stores on
#: disk are found by these keys: a change here orphans every user's cached features.
GOLDEN = [
    ({}, "fp32", "float32", "pil", "c25e2ad473237232"),
    ({}, "bf16", "float16", "pil", "0f8e6186f13cf4af"),
    ({}, "bf16", "float16", "nvjpeg", "8e2c7d1894a2331b"),
    ({"image_size": 192}, "fp32", "float32", "pil", "f4850054f012d2b8"),
    ({"image_size": 192}, "bf16", "float16", "nvjpeg", "bf117322dbdaae90"),
]


@pytest.mark.parametrize(("spec_kw", "precision", "dtype", "decoder", "key"), GOLDEN)
def test_existing_store_keys_are_byte_identical(spec_kw, precision, dtype, decoder, key):
    desc = describe_backbone(canonical_spec(resolve_spec("efficientnet_lite0", **spec_kw)))
    assert entry_key(key_parts(desc, DecodePolicy(), precision, dtype, decoder)) == key


def test_default_image_size_spelled_out_is_the_same_entry():
    # image_size=224 is lite0's default: the same features as image_size=None, one entry
    # (the key of the None-stores; 224 used to give 7bf5a67fa955ed08, a second entry).
    spec = canonical_spec(resolve_spec("efficientnet_lite0", image_size=224))
    assert spec.image_size is None
    desc = describe_backbone(spec)
    assert entry_key(key_parts(desc, DecodePolicy(), "fp32", "float32")) == "c25e2ad473237232"
    assert canonical_spec(resolve_spec("efficientnet_lite0", image_size=192)).image_size == 192


def test_entry_key_examples():
    assert entry_key({"b": 1, "a": [1, 2]}) == "94a786c3662bc7be"


def test_refusal_names_the_closest_entry_not_the_first():
    parts = {"backbone": "a", "layer": None, "precision": "bf16", "spec": {"n": "a"}}
    entries = {
        "0000": {"backbone": "b", "layer": "x", "precision": "fp32", "spec": {"n": "b"}},
        "ffff": {"backbone": "a", "layer": None, "precision": "fp32", "spec": {"n": "a"}},
    }
    assert closest_entry(parts, entries) == ("ffff", ["precision"])
    assert closest_entry(parts, {}) is None


def test_model_and_store_use_one_comparison():
    parts = {"backbone": "a", "spec": {"n": "a"}, "layer": None, "dtype": "float16"}
    check_same_spec(parts, {**parts, "dtype": "float32"}, "these")  # rounding only: accepted
    with pytest.raises(SpecMismatchError, match=r"layer: null vs \"x\""):
        check_same_spec(parts, {**parts, "layer": "x"}, "these")


def test_store_refusal_names_the_closest_entry(tmp_path):
    """Issue 19: "differs in" was computed against the first entry in key order."""
    from featurepipe.embedding import refuse_other_specs
    from featurepipe.store import FeatureStore

    base = {"backbone": "a", "spec": {"name": "a"}, "layer": None, "precision": "fp32",
            "dtype": "float32", "feature_format_version": 3}
    near = {**base, "precision": "bf16"}
    salt = 0
    while True:  # a far entry that sorts first, as the old code would have picked it
        far = {**base, "backbone": "b", "spec": {"name": "b"}, "layer": "x", "salt": salt}
        if entry_key(far) < entry_key(near):
            break
        salt += 1
    fs = FeatureStore(tmp_path / "s.h5")
    for parts in (near, far):
        with fs.writer(entry_key(parts), {**parts, "dim": 2}) as writer:
            writer.commit([], [])
    assert sorted(fs.keys())[0] == entry_key(far)
    mine = {**base, "precision": "fp16"}
    with pytest.raises(SpecMismatchError, match=r"backbone a; differs in: precision\)"):
        refuse_other_specs(fs, entry_key(mine), mine)
