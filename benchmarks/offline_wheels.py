"""A folder of the wheels a GPU machine without package access lacks, made on a connected one:

    python -m benchmarks.offline_wheels --have TARGET-FREEZE.txt --python-version 3.12 --out DIR

TARGET-FREEZE.txt is `python3 -m pip list --format=freeze` run on the target. The wheels are
the runtime closure of `srpo-workflow` (its declared dependencies and theirs, at the versions
of envs/main.lock.txt) minus what the target already has in a version that every requirement
in that closure accepts, and never the CUDA stack (torch, torchvision, triton, nvidia-*,
cuda-*), which must be the target's own: its torch is checked against the supported range
instead. `bash benchmarks/gpu.sh DIR OUT` installs the folder there. DIR/manifest.json says
why each wheel was taken and what was left to the target.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "envs" / "main.lock.txt"
PROJECT = "srpo-workflow"
TARGET_OWN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
"""The CUDA stack: far too large to carry, and bound to the target's driver."""
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, Version]:
    """`name==version` lines (a freeze or a lock); hashes, comments and the rest ignored."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line.strip())
        if match:
            pins[canonical(match.group(1))] = Version(match.group(2))
    return pins


@dataclass
class Plan:
    """What to carry (name → lock version) and why, and what the target keeps."""

    python_version: str
    bring: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    target_own: dict[str, str] = field(default_factory=dict)


def _requirements(name: str, environment: dict[str, str]) -> list[Requirement]:
    """`name`'s runtime requirements whose markers hold on the target (no extras); the
    project's own from this checkout's pyproject.toml, the others' from their metadata here."""
    if name == PROJECT:
        texts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    else:
        texts = metadata.requires(name) or []
    found = []
    for text in texts:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
            found.append(requirement)
    return found


def plan(have: dict[str, Version], lock: dict[str, Version], python_version: str) -> Plan:
    """The runtime closure of the project, split into what to carry and what the target has.

    A package the target keeps brings its own requirements along (the target's business); a
    carried one is the lock's version, whose requirements (read from the distribution
    installed here) join the closure, until no decision changes."""
    environment = {
        **default_environment(),
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
    }
    carried: set[str] = set()
    while True:
        wanted: dict[str, list[tuple[str, Requirement]]] = {}
        for requirer in [PROJECT, *sorted(carried)]:
            for requirement in _requirements(requirer, environment):
                wanted.setdefault(canonical(requirement.name), []).append((requirer, requirement))
        result = Plan(python_version)
        for name in sorted(wanted):
            present = have.get(name)
            refused = [
                f"{who} needs {requirement}"
                for who, requirement in wanted[name]
                if present is None or present not in requirement.specifier
            ]
            if TARGET_OWN.match(name):
                if refused:
                    raise ValueError(
                        f"--have: the target's {name} {present or '(missing)'} fails: "
                        f"{refused[0]}; install a CUDA build in that range there first"
                    )
                result.target_own[name] = str(present)
            elif not refused:
                result.kept[name] = str(present)
            elif name not in lock:
                raise ValueError(f"{LOCK}: {name} ({refused[0]}) is not pinned")
            else:
                result.bring[name] = str(lock[name])
                result.reasons[name] = "missing" if present is None else f"{present}: {refused[0]}"
        if set(result.bring) <= carried:
            return result
        carried |= set(result.bring)


def download(chosen: Plan, out: Path) -> None:
    """pip download of each wheel for the target's Python, without dependencies."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", chosen.python_version]
    command += ["--implementation", "cp", "--dest", str(out)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    pins = [f"{name}=={version}" for name, version in sorted(chosen.bring.items())]
    if pins:
        subprocess.run([*command, *pins], check=True)


@app.command()
def main(
    have: Annotated[
        Path, typer.Option(help="The target's `python3 -m pip list --format=freeze` output.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the wheels and manifest.json.")],
    python_version: Annotated[
        str, typer.Option(help="The target's Python version, major.minor (e.g. 3.12).")
    ] = "3.12",
    dry_run: Annotated[bool, typer.Option(help="Print the plan and download nothing.")] = False,
) -> None:
    """Download the wheels the target lacks into OUT and write OUT/manifest.json."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise typer.BadParameter(f"expected major.minor such as 3.12, got {python_version!r}")
    if not have.is_file():
        raise typer.BadParameter(f"{have}: no such file (run pip list --format=freeze there)")
    try:
        chosen = plan(read_pins(have.read_text()), read_pins(LOCK.read_text()), python_version)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for name, version in sorted(chosen.bring.items()):
        typer.echo(f"carry {name}=={version}  ({chosen.reasons[name]})")
    typer.echo(f"{len(chosen.bring)} to carry, {len(chosen.kept)} kept from the target")
    if dry_run:
        return
    download(chosen, out)
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "python_version": chosen.python_version,
                "carried": {
                    n: {"version": v, "why": chosen.reasons[n]} for n, v in chosen.bring.items()
                },
                "kept_from_target": chosen.kept,
                "target_own": chosen.target_own,
            },
            indent=2,
        )
    )
    size = sum(path.stat().st_size for path in out.glob("*.whl")) / 2**20
    typer.echo(f"wrote {len(list(out.glob('*.whl')))} wheels ({size:.1f} MiB) to {out}")


if __name__ == "__main__":
    app()
