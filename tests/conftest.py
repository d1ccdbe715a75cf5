"""Shared fixtures: models are built once per session, offline, from `srpo.tiny`."""

from pathlib import Path

import pytest
import yaml
from support import TRAIN_PROMPTS, tiny_config

from srpo.encode import encode_prompts
from srpo.tiny import build_tiny_flux, make_tiny


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-layout folder (seed 0), shared by every test that only reads it."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`srpo make-tiny` output: flux/, hpsv2/, pickscore/ and manifest.json."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_cache(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-embedding cache of the training prompts (32 T5 tokens)."""
    folder = tmp_path_factory.mktemp("cache")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    return encode_prompts(str(tiny_models / "flux"), prompts, folder / "embeddings", 32, 4)


@pytest.fixture
def write_config(tiny_models: Path, tiny_cache: Path, tmp_path: Path):
    """write_config(name, **overrides) -> path of a tiny training YAML whose output is tmp/name."""

    def write(name: str = "run", **overrides) -> Path:
        path = tmp_path / f"{name}.yaml"
        config = tiny_config(tiny_models, tiny_cache, tmp_path / name, **overrides)
        path.write_text(yaml.safe_dump(config))
        return path

    return write
