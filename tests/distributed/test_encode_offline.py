"""`srpo encode` under torchrun, and the offline mode (x₀ from real images)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support import REPO, TRAIN_PROMPTS, assert_ok, run_env, run_srpo

from srpo.encode import EmbeddingCache

pytestmark = pytest.mark.distributed


def test_encode_two_ranks_equals_one(tiny_models, tiny_cache, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--standalone", "-m", "srpo", "encode",
         "--base-model", str(tiny_models / "flux"), "--prompts", str(prompts),
         "--out-dir", str(tmp_path / "two"), "--max-sequence-length", "32"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert_ok(result)
    shards = sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    assert shards == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert load_file(str(tmp_path / "two" / shards[1]))["index"].tolist() == [4, 5, 6, 7]
    two, one = EmbeddingCache(tmp_path / "two"), EmbeddingCache(tiny_cache)
    rows = list(range(len(TRAIN_PROMPTS)))
    got, want = two.get(rows), one.get(rows)
    assert got.captions == want.captions == TRAIN_PROMPTS
    torch.testing.assert_close(got.prompt_embeds, want.prompt_embeds)
    torch.testing.assert_close(got.pooled_prompt_embeds, want.pooled_prompt_embeds)


def test_offline_mode_trains_from_real_images(write_config, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for number, colour in ((0, (200, 30, 30)), (5, (20, 160, 40))):
        Image.new("RGB", (80, 72), colour).save(images / f"{number}.png")
    config = write_config("offline", max_steps=2, mode="offline", offline_images=str(images))
    result = run_srpo(config, 2)
    assert_ok(result)
    assert (tmp_path / "offline" / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_offline_mode_rejects_unreadable_image(write_config, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.png").write_bytes(b"not a png")
    config = write_config("broken", max_steps=1, mode="offline", offline_images=str(images))
    result = run_srpo(config, None)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {images / '1.png'}: unreadable image")
    )
