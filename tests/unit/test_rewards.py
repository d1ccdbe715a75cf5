"""Reward models: tiny builds in the real on-disk formats, checked against the libraries' own APIs.

Every expected value is computed here with open_clip / transformers directly (a model loaded
independently from the same files, torchvision's own transforms), never with the code under test.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import open_clip
import pytest
import torch
import yaml
from support import REPO
from torchvision import transforms
from transformers import AutoTokenizer, CLIPModel

from srpo import scorers
from srpo.config import REWARD_PATHS, RewardConfig
from srpo.io import file_hashes
from srpo.rewards import RewardModel, hpsv2, load_reward, pickscore
from srpo.tiny import MAIN_PARTS, METRIC_ENV_PARTS

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
POSITIVE, NEGATIVE, WEIGHT = (
    "Detail. a red fox in the snow",
    "Painting. a red fox in the snow",
    0.25,
)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hpsv2.build_tiny(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pickscore.build_tiny(tmp_path_factory.mktemp("pick") / "pickscore")


def hps_arguments(folder: Path) -> dict[str, Path]:
    return {
        "checkpoint": folder / hpsv2.CHECKPOINT_NAME,
        "model_config": folder / hpsv2.CONFIG_NAME,
    }


@pytest.fixture(scope="module")
def hps(hps_dir: Path) -> RewardModel:
    return load_reward("hpsv2", **hps_arguments(hps_dir))


@pytest.fixture(scope="module")
def pick(pick_dir: Path) -> RewardModel:
    return load_reward("pickscore", model_path=pick_dir)


@pytest.fixture(params=["hps", "pick"])
def reward(request: pytest.FixtureRequest) -> RewardModel:
    return request.getfixturevalue(request.param)


def images(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def clip_pixels(batch: torch.Tensor) -> torch.Tensor:
    """The reference preprocessing: torchvision's transforms, not the code under test."""
    return transforms.Compose(
        [
            transforms.Resize(224, transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(224),
            transforms.Normalize(MEAN, STD),
        ]
    )(batch)


def reference_hps(folder: Path) -> tuple[open_clip.CLIP, open_clip.SimpleTokenizer]:
    """The tiny HPS model loaded the way the hpsv2 package loads the real one."""
    config = folder / hpsv2.CONFIG_NAME
    open_clip.add_model_config(config)
    model = open_clip.create_model(config.stem, pretrained=None)
    checkpoint = torch.load(folder / hpsv2.CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), open_clip.get_tokenizer(config.stem)


def pick_text_features(model: CLIPModel, folder: Path, prompts: list[str]) -> torch.Tensor:
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    return model.get_text_features(**tokens).pooler_output


def unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_preprocess_matches_torchvision(reward: RewardModel, size: tuple[int, int]) -> None:
    batch = images(3, *size)
    pixels = reward.preprocess(batch)
    assert pixels.shape == (3, 3, 224, 224)
    torch.testing.assert_close(pixels, clip_pixels(batch), atol=1e-5, rtol=1e-5)


def test_hps_semantic_relative_reward_by_hand(hps: RewardModel, hps_dir: Path) -> None:
    batch = images()
    model, tokenizer = reference_hps(hps_dir)
    with torch.no_grad():
        features = model.encode_image(clip_pixels(batch), normalize=True)
        positive, negative = model.encode_text(tokenizer([POSITIVE, NEGATIVE]), normalize=True)
        expected = features @ ((1 + WEIGHT) * positive - negative)
        actual = hps.semantic_relative_reward(batch, POSITIVE, NEGATIVE, WEIGHT)
    assert hps.reward_scale == 1
    assert actual.shape == (2,)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_pickscore_semantic_relative_reward_by_hand(pick: RewardModel, pick_dir: Path) -> None:
    batch = images()
    model = CLIPModel.from_pretrained(pick_dir).eval()
    with torch.no_grad():
        features = unit(model.get_image_features(pixel_values=clip_pixels(batch)).pooler_output)
        positive, negative = unit(pick_text_features(model, pick_dir, [POSITIVE, NEGATIVE]))
        scale = model.logit_scale.exp() / 20
        expected = scale * (features @ ((1 + WEIGHT) * positive - negative))
        actual = pick.semantic_relative_reward(batch, POSITIVE, NEGATIVE, WEIGHT)
    torch.testing.assert_close(torch.as_tensor(pick.reward_scale), scale)
    assert scale.item() == pytest.approx(1 / 0.07 / 20, rel=1e-3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_hps_score_is_cosine(hps: RewardModel, hps_dir: Path) -> None:
    batch, prompts = images(), ["a cat", "a dog on a sofa"]
    model, tokenizer = reference_hps(hps_dir)
    with torch.no_grad():
        image_features, text_features, _ = model(clip_pixels(batch), tokenizer(prompts))
        torch.testing.assert_close(
            hps.score(batch, prompts), (image_features * text_features).sum(-1)
        )


def test_pickscore_score_is_scaled_logit(pick: RewardModel, pick_dir: Path) -> None:
    batch, prompts = images(), ["a cat", "a dog on a sofa"]
    model = CLIPModel.from_pretrained(pick_dir).eval()
    tokens = AutoTokenizer.from_pretrained(pick_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=clip_pixels(batch)).logits_per_image
        torch.testing.assert_close(pick.score(batch, prompts), logits.diagonal())


def test_gradient_reaches_images_not_reward(reward: RewardModel) -> None:
    batch = images().requires_grad_(True)
    reward.semantic_relative_reward(batch, POSITIVE, NEGATIVE, WEIGHT).sum().backward()
    assert batch.grad is not None
    assert batch.grad.abs().sum() > 0 and torch.isfinite(batch.grad).all()
    assert not reward.training
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())


@pytest.mark.parametrize("kind", ["hpsv2", "pickscore"])
def test_to_dtype_keeps_working(kind: str, hps_dir: Path, pick_dir: Path) -> None:
    arguments = hps_arguments(hps_dir) if kind == "hpsv2" else {"model_path": pick_dir}
    fresh, batch = load_reward(kind, **arguments), images()
    expected = fresh.semantic_relative_reward(batch, POSITIVE, NEGATIVE, WEIGHT)
    actual = fresh.to("cpu", torch.float64).semantic_relative_reward(
        batch, POSITIVE, NEGATIVE, WEIGHT
    )
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual.float(), expected, atol=1e-5, rtol=1e-4)


def test_tiny_hps_has_vit_h_14_key_layout(hps_dir: Path) -> None:
    with torch.device("meta"):
        real = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    state = torch.load(hps_dir / hpsv2.CHECKPOINT_NAME, weights_only=True)["state_dict"]

    def layout(keys: object) -> set[str]:
        return {re.sub(r"resblocks\.\d+\.", "resblocks.N.", key) for key in keys}

    assert layout(state) == layout(real.state_dict())
    assert json.loads((hps_dir / hpsv2.CONFIG_NAME).read_text()) == hpsv2.TINY_CONFIG


BUILD_BOTH = """
import sys
from pathlib import Path
from typing import get_args
from srpo.rewards import hpsv2, pickscore
root = Path(sys.argv[1])
hpsv2.build_tiny(root / "hps")
pickscore.build_tiny(root / "pick" / "pickscore")
"""


def test_builds_are_byte_identical_across_processes(
    hps_dir: Path, pick_dir: Path, tmp_path: Path
) -> None:
    subprocess.run([sys.executable, "-c", BUILD_BOTH, str(tmp_path)], check=True)
    assert file_hashes(tmp_path / "hps") == file_hashes(hps_dir)
    assert file_hashes(tmp_path / "pick" / "pickscore") == file_hashes(pick_dir)
    assert set(file_hashes(pick_dir)) >= {"config.json", "model.safetensors", "tokenizer.json"}


def assert_one_line_error(error: pytest.ExceptionInfo[ValueError], *needles: object) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message


def test_missing_hps_checkpoint(hps_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(ValueError) as error:
        load_reward("hpsv2", checkpoint=missing, model_config=hps_dir / hpsv2.CONFIG_NAME)
    assert_one_line_error(error, missing, "not found", "state_dict")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x00not a torch file" * 40, "unreadable"),
        ({"model": {}}, "no 'state_dict'"),
        ({"state_dict": {"visual.proj": torch.zeros(2)}}, "missing"),
    ],
)
def test_bad_hps_checkpoint(hps_dir: Path, tmp_path: Path, content: object, needle: str) -> None:
    bad = tmp_path / "HPS_v2.1_compressed.pt"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save(content, bad)
    with pytest.raises(ValueError) as error:
        load_reward("hpsv2", checkpoint=bad, model_config=hps_dir / hpsv2.CONFIG_NAME)
    assert_one_line_error(error, bad, needle)


def test_bad_hps_model_config(hps_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "broken.json"
    config.write_text('{"embed_dim": 32}')
    with pytest.raises(ValueError) as error:
        load_reward("hpsv2", checkpoint=hps_dir / hpsv2.CHECKPOINT_NAME, model_config=config)
    assert_one_line_error(error, config, "vision_cfg")


def test_missing_pickscore_folder(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "pickscore"
    with pytest.raises(ValueError) as error:
        load_reward("pickscore", model_path=missing)
    assert_one_line_error(error, missing, "CLIPModel")


def test_unknown_reward_kind() -> None:
    with pytest.raises(ValueError) as error:
        load_reward("imagereward")
    assert_one_line_error(error, "'imagereward'", "hpsv2", "pickscore")


# ------------------------------------------------------------------ the registry (srpo.scorers)
@pytest.mark.parametrize("name", scorers.METRICS)
def test_every_scorer_resolves(name: str) -> None:
    """Each declared scorer's metric, tiny build and loader import and take the keywords it is
    given; those of another environment import here too (their packages load lazily)."""
    scorer = scorers.SCORERS[name]
    metric = inspect.signature(scorers.resolve(scorer.metric)).parameters
    assert {"batch_size", *scorer.metric_hub_keys} <= set(metric)
    assert list(inspect.signature(scorers.resolve(scorer.tiny)).parameters) == ["out_dir", "seed"]
    if scorer.reward is not None:
        loader = inspect.signature(scorers.resolve(scorer.reward.loader)).parameters
        assert [s.argument for s in scorer.reward.settings] == list(loader)


def test_reward_config_derives_from_the_registry() -> None:
    """The `reward:` keys, kinds, files and hub keys are the declared ones, described as such."""
    declared = {
        s.key: (kind, s)
        for kind in scorers.REWARD_KINDS
        for s in scorers.reward_kind(kind).settings
    }
    fields = RewardConfig.model_fields
    assert set(declared) == set(fields) - {"kind", "mix"}
    for key, (kind, setting) in declared.items():
        assert fields[key].description == f"{kind}: {setting.meaning}"
    assert {key for key, (_, setting) in declared.items() if setting.file} == REWARD_PATHS
    assert get_args(fields["kind"].annotation) == (*scorers.REWARD_KINDS, "mix")
    assert scorers.REWARD_KINDS == ("hpsv2", "pickscore", "hpsv3")
    assert scorers.HUB_KEYS == ("model_path", "processor_path")
    assert {key for key, (_, setting) in declared.items() if setting.hub} <= set(scorers.HUB_KEYS)
    with pytest.raises(ValueError) as error:
        load_reward("imagereward")
    assert_one_line_error(error, "expected one of: hpsv2, pickscore, hpsv3, mix")


def test_environments_and_tiny_parts_match_the_registry() -> None:
    """config/containers.yaml runs each scorer's rules where its declaration says; the workflow
    schema and `srpo make-tiny` know every scorer."""
    rules = yaml.safe_load((REPO / "config/containers.yaml").read_text())["containers"]["rules"]
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    for name, scorer in scorers.SCORERS.items():
        assert rules[f"score_{name}"] == scorer.environment
        if scorer.environment != scorers.MAIN:
            assert rules[f"build_tiny_{name}"] == scorer.environment
    properties = schema["properties"]
    assert set(properties["scored_metrics"]["items"]["enum"]) == set(scorers.METRICS)
    assert set(properties["metrics"]["propertyNames"]["enum"]) == set(scorers.METRICS)
    main = [name for name, s in scorers.SCORERS.items() if s.environment == scorers.MAIN]
    assert sorted(MAIN_PARTS) == sorted(["flux", *main])
    assert METRIC_ENV_PARTS == ("hpsv3", "imagereward")


def test_a_new_scorer_declares_every_part() -> None:
    """A declaration that leaves a field out, or names code without "module:attribute", fails
    when the module is imported, not when a run first needs the missing part."""
    complete = {
        "name": "clipscore",
        "title": "CLIPScore",
        "metric": "srpo.rewards.clipscore:load_metric",
        "metric_hub_keys": (),
        "tiny": "srpo.rewards.clipscore:build_tiny",
        "environment": scorers.MAIN,
        "reward": None,
    }
    assert scorers.Scorer(**complete).name == "clipscore"
    for field in complete:
        with pytest.raises(TypeError, match=field):
            scorers.Scorer(**{k: v for k, v in complete.items() if k != field})
    with pytest.raises(ValueError, match="module:attribute"):
        scorers.Scorer(**{**complete, "metric": "srpo.rewards.clipscore.load_metric"})
    with pytest.raises(ValueError, match="not a usable name"):
        scorers.Scorer(**{**complete, "name": "mix"})
    with pytest.raises(TypeError, match="settings"):
        scorers.RewardKind(loader="srpo.rewards.clipscore:load")
    with pytest.raises(TypeError, match="argument"):
        scorers.Setting(key="clip_checkpoint", meaning="a checkpoint")
    with pytest.raises(ValueError, match="hub id names a file"):
        scorers.Setting(key="k", argument="k", meaning="m", file=False, hub=True)
