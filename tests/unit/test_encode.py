"""The text-embedding cache: FLUX's own encode_prompt, sharded, and read back lazily."""

import pytest
import torch
from diffusers import FluxPipeline

from srpo.encode import EmbeddingCache, encode_prompts, shard_bounds
from srpo.io import InputError, read_prompt_file


def test_shard_bounds_cover_everything_once():
    bounds = [shard_bounds(10, rank, 3) for rank in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)]


def test_cache_equals_pipeline_encoding(tiny_flux, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na blue car\na green tree\n")
    cache = EmbeddingCache(encode_prompts(str(tiny_flux), prompts, tmp_path / "cache", 16, 2))
    assert len(cache) == 3
    got = cache.get([2, 0])
    assert got.captions == ["a green tree", "a red fox"]
    pipe = FluxPipeline.from_pretrained(str(tiny_flux), transformer=None, vae=None)
    embeds, pooled, text_ids = pipe.encode_prompt(["a green tree", "a red fox"], None,
                                                  max_sequence_length=16)  # fmt: skip
    torch.testing.assert_close(got.prompt_embeds, embeds)
    torch.testing.assert_close(got.pooled_prompt_embeds, pooled)
    torch.testing.assert_close(got.text_ids, text_ids)


def test_prompt_file_errors(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\n\nthree\n")
    with pytest.raises(InputError, match=r"p.txt:2: empty line"):
        read_prompt_file(path)
    with pytest.raises(InputError, match="prompt file not found"):
        read_prompt_file(tmp_path / "none.txt")


def test_missing_cache_is_one_line(tmp_path):
    with pytest.raises(InputError, match="embedding cache index not found"):
        EmbeddingCache(tmp_path / "index.json")
