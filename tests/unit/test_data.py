"""Counter-based draws: independent of the process layout and of history."""

import pytest
import torch
from PIL import Image

from srpo.algorithm import SRPOSettings
from srpo.io import InputError
from srpo.runtime.seeds import derive_seed
from srpo.train.data import batch_prompt_numbers, offline_images, sample_mid, step_noise


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(42, "noise", 1) == derive_seed(42, "noise", 1)
    assert derive_seed(42, "noise", 1) != derive_seed(42, "noise", 2)
    assert 0 <= derive_seed("x") < 2**63


def test_step_noise_same_everywhere_and_fresh_each_step():
    a = step_noise(7, 3, (1, 16, 64))
    torch.testing.assert_close(a, step_noise(7, 3, (1, 16, 64)), rtol=0, atol=0)
    assert not torch.equal(a, step_noise(7, 4, (1, 16, 64)))
    assert a.dtype == torch.float32


def test_mid_per_sample_in_range():
    settings = SRPOSettings()
    mids = [sample_mid(42, 1, sample, settings) for sample in range(32)]
    assert all(5 <= m <= 995 for m in mids)
    assert len(set(mids)) > 20  # each sample has its own draw
    assert mids == [sample_mid(42, 1, sample, settings) for sample in range(32)]


def test_batches_cover_each_epoch_once():
    pool = list(range(10))
    first_epoch = [n for step in (1, 2) for n in batch_prompt_numbers(3, step, 5, pool)]
    assert sorted(first_epoch) == pool
    assert batch_prompt_numbers(3, 3, 5, pool) != batch_prompt_numbers(3, 1, 5, pool)
    # a batch straddling epochs: positions 8..11
    assert len(batch_prompt_numbers(3, 3, 4, pool)) == 4


def test_offline_images_must_be_named_by_prompt_number(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "3.png")
    assert offline_images(tmp_path, 5) == {3: tmp_path / "3.png"}
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(InputError, match=r"cat\.png: expected a file named <prompt number>\.png"):
        offline_images(tmp_path, 5)
