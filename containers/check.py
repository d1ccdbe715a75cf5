"""Static checks of the images: every FROM pinned by digest, and an image holding exactly the
packages of the locks CI tested. CI runs them (scripts/test.sh, stage containers); each one
exits 1 with one line per problem.

    python containers/check.py dockerfile containers/Dockerfile
    python containers/check.py image srpo-main:cpu --env main
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"(^|@)sha256:[0-9a-f]{64}$")
LABEL = "io.srpo-workflow"
app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def unpinned_bases(dockerfile: Path) -> list[str]:
    """Each FROM whose image (after the ARG defaults before it) is not pinned by digest."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    problems = []
    for word, rest in _instructions(dockerfile):
        if word == "ARG":
            name, _, value = rest.partition("=")
            defaults.setdefault(name.strip(), value.strip().strip('"'))
        elif word == "FROM":
            parts = [part for part in rest.split() if not part.startswith("--")]
            ref = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], ""), parts[0])
            if ref not in stages and not DIGEST.search(ref):
                problems.append(
                    f"{dockerfile}: FROM {parts[0]} (= {ref!r}) is not pinned by digest"
                )
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return problems


def lock_pins(lock: Path) -> dict[str, str]:
    """{normalised name: version} of a hashed lock (envs/NAME.lock.txt)."""
    text = lock.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, version = requirement.split()[0].split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Run by the environment's own interpreter in the image: the version each pin resolves to there.
_PROBE = """
import json, sys
from importlib import metadata
found = {}
for name in json.loads(sys.argv[1]):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
print(json.dumps({"found": found, "all": [d.metadata["Name"] for d in metadata.distributions()]}))
"""


def _probe(engine: str, image: str, python: str, names: list[str]) -> dict:
    """What the interpreter `python` in `image` has: {"found": {name: version}, "all": [...]}."""
    command = [engine, "run", "--rm", "--entrypoint", python, image, "-c", _PROBE]
    result = subprocess.run([*command, json.dumps(names)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{image}: {python} failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


def _fail(problems: list[str]) -> int:
    for problem in problems:
        typer.echo(problem, err=True)
    return 1 if problems else 0


def image_problems(engine: str, image: str, env: str, locks: Path) -> list[str]:
    """Labels naming the locks, and each lock's pins installed at exactly that version."""
    inspect = subprocess.run(
        [engine, "image", "inspect", "--format", "{{json .Config.Labels}}", image],
        capture_output=True,
        text=True,
    )
    if inspect.returncode != 0:
        return [f"{image}: no such image ({inspect.stderr.strip()})"]
    labels = json.loads(inspect.stdout) or {}
    problems = []
    for label, lock in ((f"{LABEL}.main-lock-sha256", "main"), (f"{LABEL}.lock-sha256", env)):
        want = _sha256(locks / f"{lock}.lock.txt")
        if labels.get(label) != want:
            problems.append(
                f"{image}: label {label}={labels.get(label)} but {locks}/{lock}.lock.txt"
                f" has sha256 {want}"
            )
    base = labels.get("org.opencontainers.image.base.name", "")
    if not DIGEST.search(base):
        problems.append(f"{image}: base image {base!r} is not pinned by digest")
    interpreters = {"main": "/opt/srpo-workflow/.venv/bin/python"}
    if env != "main":
        interpreters[env] = f"/opt/srpo-workflow/.venv-{env}/bin/python"
    for lock, python in interpreters.items():
        pins = lock_pins(locks / f"{lock}.lock.txt")
        try:
            report = _probe(engine, image, python, list(pins))
        except RuntimeError as error:
            problems.append(str(error))
            continue
        for name, version in sorted(pins.items()):
            if report["found"][name] != version:
                problems.append(
                    f"{image}: {python} has {name} {report['found'][name]}, but"
                    f" {locks}/{lock}.lock.txt pins {version}"
                )
        if lock == "main":
            installed = {re.sub(r"[-_.]+", "-", n).lower() for n in report["all"]}
            for name in sorted(installed - set(pins) - {"srpo-workflow"}):
                problems.append(f"{image}: {name} is installed but not in {locks}/main.lock.txt")
    return problems


@app.command()
def dockerfile(
    paths: Annotated[list[Path], typer.Argument(help="Dockerfiles to check.")],
) -> None:
    """Every FROM names its image by digest (ARG defaults are followed)."""
    raise typer.Exit(_fail([problem for path in paths for problem in unpinned_bases(path)]))


@app.command()
def image(
    reference: Annotated[str, typer.Argument(help="Image to check, e.g. srpo-main:cpu.")],
    env: Annotated[str, typer.Option(help="Its environment: main, hpsv3 or imagereward.")],
    locks: Annotated[Path, typer.Option(help="Folder of the locks CI tested.")] = REPO / "envs",
    engine: Annotated[str, typer.Option(help="docker or podman.")] = "docker",
) -> None:
    """The image holds exactly the locks' packages and its labels name the locks' hashes."""
    raise typer.Exit(_fail(image_problems(engine, reference, env, locks)))


if __name__ == "__main__":
    sys.exit(app())
