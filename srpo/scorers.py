"""Every scorer declared once: its evaluation metric, its tiny build, the environment it runs in,
and, when it can also train (a reward kind), the `reward:` keys its loader takes.

Everything per kind derives from `SCORERS`: the training config's validation and messages,
`srpo.rewards.load_reward`, `srpo.rewards.metric.load_metric`, `srpo make-tiny`, the keys
`srpo doctor` and `srpo score` treat as hub ids. The code is named by "module:attribute"
strings, imported only when used: the workflow imports this module (through `srpo.config`)
while Snakemake parses it, where torch must not be imported.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

MAIN = "main"
"""The environment of `srpo` itself; any other is a `.venv-NAME` (envs/metric-env.sh)."""
MIX = "mix"
"""The reward kind that sums the rewards of several scorers (`reward.mix`)."""
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def resolve(reference: str) -> Any:
    """The object a "module:attribute" reference names, importing its module now."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One key of the training config's `reward:` section and the loader keyword it fills."""

    key: str
    argument: str
    meaning: str
    """The key's description in the config, after its kind's name."""
    file: bool = True
    """Names a file or folder (or a hub id): hashed, verified, free to change on resume."""
    hub: bool = False
    """May be a hub id, so it is passed on as a string and checked for reach, not presence."""
    required: bool = False

    def __post_init__(self) -> None:
        if self.hub and not self.file:
            raise ValueError(f"setting {self.key}: a hub id names a file; set file=True")


@dataclass(frozen=True, kw_only=True)
class RewardKind:
    """How a scorer loads as a training reward (`reward.kind`)."""

    loader: str
    """"module:attribute" of its `load`, called with the settings' keywords."""
    settings: tuple[Setting, ...]

    def __post_init__(self) -> None:
        _check_reference(self.loader)
        keys = [setting.key for setting in self.settings]
        if len(set(keys)) != len(keys):
            raise ValueError(f"reward settings: a key appears twice in {keys}")


@dataclass(frozen=True, kw_only=True)
class Scorer:
    """One scorer; every field is required, so a new one cannot leave a part undeclared."""

    name: str
    title: str
    """Its name in tables and figures (the paper's)."""
    metric: str
    """"module:attribute" of its `load_metric`, called with `srpo score`'s --weight keywords."""
    metric_hub_keys: tuple[str, ...]
    """Its metric's --weight keys that may name a hub id rather than a file."""
    tiny: str
    """"module:attribute" of the `build_tiny(out_dir, seed)` of `srpo make-tiny --part NAME`."""
    environment: str
    """MAIN, or the `.venv-NAME` its published package needs (which main cannot hold)."""
    reward: RewardKind | None
    """None for a scorer that only evaluates."""

    def __post_init__(self) -> None:
        for name in (self.name, self.environment):
            if not _NAME.match(name) or name == MIX:
                raise ValueError(f"scorer {self.name!r}: {name!r} is not a usable name")
        _check_reference(self.metric)
        _check_reference(self.tiny)


def _check_reference(reference: str) -> None:
    if not _REFERENCE.match(reference):
        raise ValueError(f"{reference!r}: expected a 'module:attribute' reference")


_HPSV2 = RewardKind(
    loader="srpo.rewards.hpsv2:load",
    settings=(
        Setting(
            key="checkpoint",
            argument="checkpoint",
            meaning="path of HPS_v2.1_compressed.pt ({'state_dict': ...})",
            required=True,
        ),
        Setting(
            key="model_name",
            argument="model_name",
            meaning="open_clip architecture name",
            file=False,
        ),
        Setting(
            key="model_config_path",
            argument="model_config",
            meaning="open_clip model-config JSON for a non-built-in architecture",
        ),
    ),
)
_PICKSCORE = RewardKind(
    loader="srpo.rewards.pickscore:load",
    settings=(
        Setting(
            key="model_path",
            argument="model_path",
            meaning="CLIPModel folder or hub id",
            hub=True,
            required=True,
        ),
        Setting(
            key="processor_path",
            argument="processor_path",
            meaning="CLIP processor folder or hub id (default: model_path)",
            hub=True,
        ),
    ),
)
_HPSV3 = RewardKind(
    loader="srpo.rewards.hpsv3:load",
    settings=(
        Setting(
            key="hpsv3_checkpoint",
            argument="checkpoint",
            meaning="path of HPSv3.safetensors",
            required=True,
        ),
        Setting(
            key="hpsv3_config",
            argument="config",
            meaning="the hpsv3 package's config yaml (default: its HPSv3_7B.yaml, whose base "
            "model Qwen/Qwen2-VL-7B-Instruct must be in the Hugging Face cache)",
        ),
        Setting(
            key="hpsv3_scale",
            argument="scale",
            meaning="factor on (1 + w)·μ(x, p) − μ(x, n)",
            file=False,
        ),
    ),
)


def _scorer(
    name: str, title: str, environment: str, reward: RewardKind | None, *hub: str
) -> Scorer:
    """A scorer whose code is `srpo.rewards.<name>`'s `load_metric` and `build_tiny`."""
    module = f"srpo.rewards.{name}"
    return Scorer(
        name=name,
        title=title,
        metric=f"{module}:load_metric",
        metric_hub_keys=hub,
        tiny=f"{module}:build_tiny",
        environment=environment,
        reward=reward,
    )


SCORERS: dict[str, Scorer] = {
    scorer.name: scorer
    for scorer in (
        _scorer("hpsv2", "HPSv2.1", MAIN, _HPSV2),
        _scorer("aesthetic", "Aesthetic", MAIN, None),
        _scorer("pickscore", "PickScore", MAIN, _PICKSCORE, "model_path", "processor_path"),
        _scorer("imagereward", "ImageReward", "imagereward", None),
        _scorer("hpsv3", "HPSv3", "hpsv3", _HPSV3),
    )
}
METRICS = tuple(SCORERS)
"""Names `srpo.rewards.metric.load_metric` accepts, in the order its messages list them."""
TABLE_ORDER = ("hpsv2", "hpsv3", "aesthetic", "pickscore", "imagereward")
"""The order of the paper's tables (`srpo report`): every scorer, once."""
if sorted(TABLE_ORDER) != sorted(METRICS):
    raise ValueError(f"TABLE_ORDER {TABLE_ORDER} must list every scorer of {METRICS} once")
REWARD_KINDS = tuple(name for name, scorer in SCORERS.items() if scorer.reward)
"""Scorers that can train, alone or in a mix (`reward.kind`, the keys of `reward.mix`)."""


def reward_kind(name: str) -> RewardKind:
    """The training side of scorer `name`, which must be one of REWARD_KINDS."""
    reward = SCORERS[name].reward
    if reward is None:
        raise KeyError(f"{name}: not a reward kind; expected one of {list(REWARD_KINDS)}")
    return reward


def setting(key: str) -> tuple[str, Setting]:
    """(reward kind, setting) of a key of the `reward:` section."""
    for name in REWARD_KINDS:
        for candidate in reward_kind(name).settings:
            if candidate.key == key:
                return name, candidate
    raise KeyError(f"reward.{key}: no reward kind declares it")


def _hub_keys() -> tuple[str, ...]:
    rewards = [s.key for name in REWARD_KINDS for s in reward_kind(name).settings if s.hub]
    metrics = [key for scorer in SCORERS.values() for key in scorer.metric_hub_keys]
    return tuple(dict.fromkeys(rewards + metrics))


HUB_KEYS = _hub_keys()
"""Weight keys (of `reward:`, of a metric's --weight) that may name a hub id; every other key
names a file."""
