"""Evaluation metrics checked against the scorers' own code on tiny models in the real formats.

References: the real hpsv2 1.2.0 package (its `score`, preprocessing and tokenizer) for HPSv2.1;
open_clip plus the MLP as explicit matmuls for the aesthetic predictor; transformers' `CLIPModel`
and `CLIPProcessor` for PickScore. Nothing here computes an expected value with the code under test.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import default_bpe
from PIL import Image
from torch import nn
from torchvision import transforms
from transformers import CLIPModel, CLIPProcessor

from srpo.io import InputError, file_hashes
from srpo.rewards import aesthetic, hpsv2, pickscore
from srpo.rewards.metric import Metric, load_metric
from srpo.scorers import MAIN, METRICS, SCORERS

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a cat", "a dog on a sofa", "a red fox in the snow", "portrait", "a lighthouse at dusk"]
HPSV2_PIP = "pip install --no-deps hpsv2==1.2.0 clint==0.5.1 args==0.1.0"
HERE = [name for name in METRICS if SCORERS[name].environment == MAIN]
"""The metrics of the main environment; the others are tested in tests/metric_envs."""


def pil_images() -> list[Image.Image]:
    """Noise pictures: portrait, landscape, square at 224, a wide one, and one greyscale."""
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (200, 300), (224, 224), (101, 301), (90, 70)]
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pictures[-1] = pictures[-1].convert("L")
    return pictures


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hpsv2.build_tiny(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def aes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return aesthetic.build_tiny(tmp_path_factory.mktemp("aesthetic"))


@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pickscore.build_tiny(tmp_path_factory.mktemp("pick") / "pickscore")


def hps_paths(folder: Path) -> dict[str, Path]:
    return {
        "checkpoint": folder / hpsv2.CHECKPOINT_NAME,
        "model_config": folder / hpsv2.CONFIG_NAME,
    }


def aes_paths(folder: Path) -> dict[str, Path]:
    return {
        "clip_checkpoint": folder / aesthetic.CLIP_CHECKPOINT_NAME,
        "mlp_checkpoint": folder / aesthetic.MLP_CHECKPOINT_NAME,
        "model_config": folder / aesthetic.CONFIG_NAME,
    }


@pytest.fixture
def paths(hps_dir: Path, aes_dir: Path, pick_dir: Path) -> dict[str, dict[str, Path]]:
    return {
        "hpsv2": hps_paths(hps_dir),
        "aesthetic": aes_paths(aes_dir),
        "pickscore": {"model_path": pick_dir},
    }


@pytest.fixture
def weights(hps_dir: Path, aes_dir: Path, pick_dir: Path) -> dict[str, list[Path]]:
    """The weight files each metric must hash (configs hold no weights)."""
    return {
        "hpsv2": [hps_dir / hpsv2.CHECKPOINT_NAME],
        "aesthetic": [
            aes_dir / aesthetic.CLIP_CHECKPOINT_NAME,
            aes_dir / aesthetic.MLP_CHECKPOINT_NAME,
        ],
        "pickscore": [pick_dir / "model.safetensors"],
    }


@pytest.fixture(scope="module")
def hpsv2_package() -> ModuleType:
    """The real hpsv2 1.2.0 scorer module, `hpsv2.img_score`.

    Installed with --no-deps (it pins pytest 7 and protobuf<4); `import hpsv2` needs `clint`.
    Its wheel lacks the BPE vocabulary its vendored open_clip tokenizer reads at import: open_clip's
    own file (the same merges) is copied into the installed package once if absent.
    """
    spec = importlib.util.find_spec("hpsv2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip(f"hpsv2 is not installed ({HPSV2_PIP})")
    vendored = Path(spec.submodule_search_locations[0]) / "src" / "open_clip"
    bpe = vendored / Path(default_bpe()).name
    if not bpe.exists():
        shutil.copyfile(default_bpe(), bpe)
    return importlib.import_module("hpsv2.img_score")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_hpsv2_equals_the_hpsv2_package(
    hpsv2_package: ModuleType, hps_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our scores = hpsv2.img_score.score with the package's own model, preprocess and tokenizer.

    `initialize_model` is the package's call minus the hub download: the same
    create_model_and_transforms arguments on the tiny config, fp32 on CPU.
    """
    vendored = importlib.import_module("hpsv2.src.open_clip")
    config = hps_dir / hpsv2.CONFIG_NAME
    vendored.add_model_config(config)
    model, _, preprocess_val = vendored.create_model_and_transforms(
        config.stem,
        pretrained=None,
        precision="fp32",
        device="cpu",
        light_augmentation=True,
        output_dict=True,
    )
    monkeypatch.setattr(hpsv2_package, "device", "cpu")
    monkeypatch.setattr(
        hpsv2_package, "model_dict", {"model": model, "preprocess_val": preprocess_val}
    )
    images, checkpoint = pil_images(), str(hps_dir / hpsv2.CHECKPOINT_NAME)
    expected = [
        float(hpsv2_package.score([image], prompt, cp=checkpoint, hps_version="v2.1")[0])
        for image, prompt in zip(images, PROMPTS, strict=True)
    ]
    metric = load_metric("hpsv2", batch_size=2, **hps_paths(hps_dir))
    for image in images:
        torch.testing.assert_close(
            metric.pixels([image])[0], preprocess_val(image), atol=1e-6, rtol=0
        )
    assert metric.score(images, PROMPTS) == pytest.approx(expected, abs=1e-5, rel=0)


def test_vendored_vit_h_14_has_open_clip_layout(hpsv2_package: ModuleType) -> None:
    """The real HPS_v2.1 checkpoint fits our open_clip 3.3 model as it fits the package's."""
    vendored = importlib.import_module("hpsv2.src.open_clip")
    with torch.device("meta"):
        theirs = vendored.CLIP(**vendored.get_model_config("ViT-H-14")).state_dict()
        ours = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14")).state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}


def openai_clip_transform(image: Image.Image) -> torch.Tensor:
    """OpenAI's `clip._transform(224)`, written out: what the aesthetic predictor was fed."""
    return transforms.Compose(
        [
            transforms.Resize(224, transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            lambda picture: picture.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )(image)


def test_aesthetic_by_hand(aes_dir: Path) -> None:
    """open_clip's encode_image, L2 normalisation, then the five layers as explicit matmuls."""
    config = aes_dir / aesthetic.CONFIG_NAME
    open_clip.add_model_config(config)
    clip = open_clip.create_model(config.stem, pretrained=None).eval()
    clip.load_state_dict(torch.load(aes_dir / aesthetic.CLIP_CHECKPOINT_NAME, weights_only=True))
    layers = torch.load(aes_dir / aesthetic.MLP_CHECKPOINT_NAME, weights_only=True)
    images = pil_images()
    pixels = torch.stack([openai_clip_transform(image) for image in images])
    with torch.no_grad():
        embeddings = clip.encode_image(pixels)
    hidden = embeddings / embeddings.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # no activation between the layers: the published head
        hidden = hidden @ layers[f"layers.{index}.weight"].T + layers[f"layers.{index}.bias"]

    metric = load_metric("aesthetic", batch_size=3, **aes_paths(aes_dir))
    torch.testing.assert_close(metric.pixels(images), pixels, atol=1e-6, rtol=0)
    assert metric.score(images, PROMPTS) == pytest.approx(hidden[:, 0].tolist(), abs=1e-5, rel=0)


def test_aesthetic_head_is_the_published_one() -> None:
    layers = aesthetic.AestheticMLP(768).layers
    assert [type(m).__name__ for m in layers] == ["Linear", "Dropout"] * 3 + ["Linear"] * 2
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    widths = [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)]
    assert widths == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]


def layout(state: dict[str, torch.Tensor]) -> set[str]:
    return {re.sub(r"resblocks\.\d+\.", "resblocks.N.", key) for key in state}


def test_tiny_aesthetic_has_openai_vit_l_14_layout(aes_dir: Path) -> None:
    real_config = open_clip.get_model_config(aesthetic.CLIP_MODEL)
    assert real_config == {**open_clip.get_model_config("ViT-L-14"), "quick_gelu": True}
    with torch.device("meta"):
        real = open_clip.CLIP(**real_config).state_dict()
    tiny = torch.load(aes_dir / aesthetic.CLIP_CHECKPOINT_NAME, weights_only=True)
    assert layout(tiny) == layout(real)
    mlp = torch.load(aes_dir / aesthetic.MLP_CHECKPOINT_NAME, weights_only=True)
    assert list(mlp) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert mlp["layers.0.weight"].shape == (1024, aesthetic.TINY_CONFIG["embed_dim"])


def save_like_openai(state: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state dict is `state` plus OpenAI's three metadata entries,
    the format of OpenAI's released ViT-L-14.pt."""
    metadata = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
    root = nn.Module()
    for key, value in {**state, **{k: torch.tensor(v) for k, v in metadata.items()}}.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        module.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_aesthetic_loads_openai_torchscript(aes_dir: Path, tmp_path: Path) -> None:
    scripted = tmp_path / "ViT-L-14.pt"
    save_like_openai(
        torch.load(aes_dir / aesthetic.CLIP_CHECKPOINT_NAME, weights_only=True), scripted
    )
    images = pil_images()
    expected = load_metric("aesthetic", **aes_paths(aes_dir)).score(images, PROMPTS)
    metric = load_metric("aesthetic", **{**aes_paths(aes_dir), "clip_checkpoint": scripted})
    assert metric.score(images, PROMPTS) == pytest.approx(expected, abs=1e-6, rel=0)


def test_pickscore_equals_transformers(pick_dir: Path) -> None:
    """PickScore's README: processor → CLIPModel → logits_per_image; image i vs prompt i."""
    model = CLIPModel.from_pretrained(pick_dir).eval()
    processor = CLIPProcessor.from_pretrained(pick_dir, backend="pil")
    images = pil_images()
    inputs = processor(
        text=PROMPTS,
        images=images,
        padding=True,
        truncation=True,
        max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal()
    metric = load_metric("pickscore", batch_size=2, model_path=pick_dir)
    torch.testing.assert_close(metric.pixels(images), inputs["pixel_values"], atol=1e-6, rtol=0)
    assert metric.score(images, PROMPTS) == pytest.approx(expected.tolist(), abs=1e-5, rel=0)


@pytest.mark.parametrize("name", HERE)
def test_metric_interface(
    name: str, paths: dict[str, dict[str, Path]], weights: dict[str, list[Path]]
) -> None:
    metric = load_metric(name, **paths[name])
    assert isinstance(metric, Metric) and metric.name == name
    versions = {"hpsv2": "HPSv2.1", "aesthetic": "LAION-aesthetic-v2", "pickscore": "PickScore_v1"}
    assert metric.version == versions[name]
    assert metric.checkpoint_sha256 == {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in weights[name]
    }
    images = pil_images()
    scores = metric.score(images, PROMPTS)
    assert len(scores) == len(images) and all(isinstance(s, float) for s in scores)
    metric.batch_size = 2
    assert metric.score(images, PROMPTS) == pytest.approx(scores, abs=1e-5, rel=0)
    assert metric.score([], []) == []
    assert not any(p.requires_grad for p in metric.model.parameters())
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        metric.score(images, PROMPTS[:4])


@pytest.mark.parametrize("name", HERE)
def test_dtype_and_device_are_applied(name: str, paths: dict[str, dict[str, Path]]) -> None:
    images = pil_images()[:2]
    expected = load_metric(name, **paths[name]).score(images, PROMPTS[:2])
    metric = load_metric(name, device="cpu", dtype=torch.float64, **paths[name])
    assert metric.dtype == torch.float64 and metric.device == torch.device("cpu")
    assert metric.score(images, PROMPTS[:2]) == pytest.approx(expected, abs=1e-4, rel=1e-4)


BUILD = """
import sys
from srpo.rewards import aesthetic
aesthetic.build_tiny(sys.argv[1])
"""


def test_tiny_aesthetic_is_byte_identical_across_processes(aes_dir: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], check=True)
    assert file_hashes(tmp_path) == file_hashes(aes_dir)
    assert set(file_hashes(aes_dir)) == {
        aesthetic.CLIP_CHECKPOINT_NAME,
        aesthetic.MLP_CHECKPOINT_NAME,
        aesthetic.CONFIG_NAME,
    }


def one_line_error(name: str, *needles: object, **arguments: object) -> None:
    with pytest.raises(InputError) as error:
        load_metric(name, **arguments)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


def test_unknown_metric_name() -> None:
    one_line_error("clipscore", "'clipscore'", *METRICS)


@pytest.mark.parametrize(
    ("name", "package", "files"),
    [
        ("imagereward", "ImageReward", ("checkpoint", "med_config")),
        ("hpsv3", "hpsv3", ("checkpoint",)),
    ],
)
def test_own_environment_metrics_name_their_environment(
    name: str, package: str, files: tuple[str, ...], tmp_path: Path
) -> None:
    """Their packages are not importable here: one line saying which environment to use."""
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is importable: this is its own environment")
    environment = SCORERS[name].environment
    hint = f"run with srpo-{environment} after bash envs/metric-env.sh {environment}"
    one_line_error(name, package, hint, **dict.fromkeys(files, tmp_path / "absent"))


def test_batch_size_must_be_positive(hps_dir: Path) -> None:
    one_line_error("hpsv2", "hpsv2", "batch_size", batch_size=0, **hps_paths(hps_dir))


def test_missing_checkpoints(hps_dir: Path, aes_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    one_line_error("hpsv2", missing, "not found", **{**hps_paths(hps_dir), "checkpoint": missing})
    for key in ("clip_checkpoint", "mlp_checkpoint"):
        one_line_error("aesthetic", missing, "not found", **{**aes_paths(aes_dir), key: missing})
    one_line_error("pickscore", tmp_path / "absent", "CLIPModel", model_path=tmp_path / "absent")


def write(path: Path, content: object) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x00not a torch file" * 40, "unreadable CLIP checkpoint"),
        ({"visual.proj": torch.zeros(2)}, "missing"),
        ({}, "unreadable CLIP checkpoint"),
    ],
)
def test_bad_clip_checkpoint(aes_dir: Path, tmp_path: Path, content: object, needle: str) -> None:
    bad = write(tmp_path / "ViT-L-14.pt", content)
    one_line_error("aesthetic", bad, needle, **{**aes_paths(aes_dir), "clip_checkpoint": bad})


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x00not a torch file" * 40, "unreadable aesthetic MLP"),
        ({"layers.0.weight": torch.zeros(1024, 32)}, "layers.7.bias"),
        (aesthetic.AestheticMLP(768).state_dict(), "(1024, 768), expected (1024, 32)"),
    ],
)
def test_bad_mlp_checkpoint(aes_dir: Path, tmp_path: Path, content: object, needle: str) -> None:
    bad = write(tmp_path / aesthetic.MLP_CHECKPOINT_NAME, content)
    one_line_error("aesthetic", bad, needle, **{**aes_paths(aes_dir), "mlp_checkpoint": bad})


def test_make_tiny_includes_aesthetic(tiny_models: Path) -> None:
    metric = load_metric("aesthetic", **aes_paths(tiny_models / "aesthetic"))
    assert len(metric.score(pil_images()[:1], PROMPTS[:1])) == 1
    manifest = (tiny_models / "manifest.json").read_text()
    assert f"aesthetic/{aesthetic.MLP_CHECKPOINT_NAME}" in manifest
