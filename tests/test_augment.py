"""Training augmentation presets (featurepipe.finetune.augment)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from featurepipe.backbones import PreprocessSpec
from featurepipe.exceptions import ConfigError
from featurepipe.finetune.augment import AUGMENTS, train_transform

PRE = PreprocessSpec((32, 32), 36, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
WHITE = Image.new("RGB", (40, 30), (255, 255, 255))  # normalises to exactly 1.0 everywhere


@pytest.mark.parametrize("augment", [a for a in AUGMENTS if a is not None])
def test_every_preset_gives_a_normalised_input_sized_tensor(augment):
    torch.manual_seed(0)
    x = train_transform(PRE, augment)(Image.new("RGB", (40, 30), (10, 200, 90)))
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5


def test_erasing_blanks_a_box_to_the_mean_in_about_half_the_draws():
    torch.manual_seed(0)
    erasing, basic = train_transform(PRE, "erasing"), train_transform(PRE, "basic")
    erased = [bool((erasing(WHITE) == 0).all(dim=0).any()) for _ in range(40)]
    assert 8 <= sum(erased) <= 32  # p=0.5
    assert not any(bool((basic(WHITE) == 0).any()) for _ in range(10))  # only erasing does it


def test_an_unknown_preset_is_named_in_the_error():
    with pytest.raises(ConfigError, match="cutmix"):
        train_transform(PRE, "cutmix")
