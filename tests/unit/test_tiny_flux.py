"""The tiny FLUX folder loads and runs like the real one, and is byte-identical on every build."""

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from srpo.text_tokenizers import build_clip_tokenizer, build_t5_tokenizer
from srpo.tiny import build_tiny_flux, file_hashes

SENTENCES = [
    "a photo of a cat",
    "A Beautiful sunset over the mountains, highly detailed, 8k!!",
    "don't   stop\tme now -- it's 3:45pm (really)",
    "portrait of an astronaut riding a horse on Mars, trending on artstation",
]
BUILD_SCRIPT = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "from srpo.tiny import build_tiny_flux, file_hashes\n"
    "print(json.dumps(file_hashes(build_tiny_flux(Path(sys.argv[1])))))\n"
)


def test_pipeline_generates_image(tiny_flux: Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    image = pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)


def test_builds_identical_across_processes(tiny_flux: Path, tmp_path: Path) -> None:
    """A fresh interpreter and another folder name give the bytes of this busy process's build."""
    run = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(tmp_path / "other-name")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    hashes = json.loads(run.stdout.splitlines()[-1])
    assert hashes == file_hashes(tiny_flux)
    assert "transformer/diffusion_pytorch_model.safetensors" in hashes
    assert list(hashes) == sorted(hashes)


def test_rebuild_replaces_folder_whole(tmp_path: Path) -> None:
    out = tmp_path / "flux"
    out.mkdir()
    (out / "stale.txt").write_text("left from an older build")
    build_tiny_flux(out)
    assert not (out / "stale.txt").exists()
    assert (out / "model_index.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["flux"]


def test_clip_tokenizer_matches_open_clip() -> None:
    tokenizer = build_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    for sentence in SENTENCES:
        expected = reference([sentence])[0].tolist()
        expected = expected[: expected.index(reference.eot_token_id) + 1]
        assert tokenizer(sentence).input_ids == expected


def test_clip_tokenizer_pads_like_flux() -> None:
    ids = build_clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert set(ids[3:]) == {49407}


def test_t5_tokenizer_pieces() -> None:
    tokenizer = build_t5_tokenizer()
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2]
    assert tokenizer.model_max_length == 512
    ids = tokenizer("a photo of cats, highly detailed").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["▁a", "▁photo", "▁of", "▁cat", "s", ",", "▁highly", "▁detailed", "</s>"]
    for sentence in SENTENCES:
        ids = tokenizer(sentence).input_ids
        assert ids[-1] == 1
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(sentence.split())


@pytest.mark.parametrize(
    ("build", "cls"), [(build_clip_tokenizer, CLIPTokenizer), (build_t5_tokenizer, T5Tokenizer)]
)
def test_tokenizers_save_identically(build, cls, tmp_path: Path) -> None:
    build().save_pretrained(tmp_path / "first")
    build().save_pretrained(tmp_path / "second")
    assert file_hashes(tmp_path / "first") == file_hashes(tmp_path / "second")
    reloaded = cls.from_pretrained(tmp_path / "first")
    assert type(reloaded) is cls
    assert reloaded(SENTENCES).input_ids == build()(SENTENCES).input_ids
