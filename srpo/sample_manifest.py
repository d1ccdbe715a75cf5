"""The sample manifests' one owner: their file names, fields, writing, reading and sha256 checks.

Layout of a sample folder:
    images/00012.png                         one PNG per prompt id
    manifests/shard-000-of-004.json          one shard's spec (settings, model, prompts) and
                                             its images with their seeds and sha256
    manifests/shard-000-of-004.progress.json the images the shard's last run has made so far
    manifest.json                            shards 0..n−1 merged by `gather_manifests`
Every manifest is written by `srpo.io.write_json` with its keys in one order (spec, shard,
images, provenance), so equal records give equal bytes. A reader trusts an image only while its
bytes still have the sha256 its manifest records; any other image is a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srpo.io import InputError, clear_staging, one_line, sha256_file, write_json
from srpo.prompts import EvalPrompt

MANIFEST = "manifest.json"
SPEC_KEYS = ("settings", "model", "prompts")
ENTRY_KEYS = {"prompt_id", "style", "prompt", "seed", "file", "sha256"}


@dataclass(frozen=True)
class SampledImage:
    prompt_id: int
    style: str
    prompt: str
    path: Path
    sha256: str | None = None  # recorded by `srpo sample`; None in a hand-made manifest


def image_file(prompt_id: int) -> str:
    """An image's path relative to its sample folder, as manifests record it."""
    return f"images/{prompt_id:05d}.png"


def shard_manifest(out_dir: Path, shard: int, shards: int) -> Path:
    return Path(out_dir) / "manifests" / f"shard-{shard:03d}-of-{shards:03d}.json"


def progress_manifest(out_dir: Path, shard: int, shards: int) -> Path:
    return shard_manifest(out_dir, shard, shards).with_suffix(".progress.json")


def gathered_manifest(out_dir: Path) -> Path:
    return Path(out_dir) / MANIFEST


def make_spec(
    settings: dict[str, Any], model: dict[str, Any], prompts: dict[str, Any]
) -> dict[str, Any]:
    """What makes a folder's images what they are; two manifests agree when their specs do."""
    return {"settings": settings, "model": model, "prompts": prompts}


def image_entry(prompt: EvalPrompt, seed: int, sha256: str) -> dict[str, Any]:
    """One image's record; `seed` is the image's own (derived) seed."""
    return {
        "prompt_id": prompt.prompt_id,
        "style": prompt.style,
        "prompt": prompt.prompt,
        "seed": seed,
        "file": image_file(prompt.prompt_id),
        "sha256": sha256,
    }


def write_progress(
    out_dir: Path, spec: dict[str, Any], shard: int, shards: int, images: list[dict[str, Any]]
) -> None:
    """The images a shard has made so far: they vouch for those images after a stop."""
    shard_record = {"index": shard, "count": shards}
    write_json(
        progress_manifest(out_dir, shard, shards),
        {**spec, "shard": shard_record, "images": images},
    )


def write_shard(
    out_dir: Path,
    spec: dict[str, Any],
    shard: int,
    shards: int,
    images: list[dict[str, Any]],
    provenance: dict[str, Any],
) -> Path:
    """A finished shard's manifest, the input of `gather_manifests`."""
    path = shard_manifest(out_dir, shard, shards)
    shard_record = {"index": shard, "count": shards}
    write_json(path, {**spec, "shard": shard_record, "images": images, "provenance": provenance})
    return path


def _spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: manifest.get(key) for key in SPEC_KEYS}


def recorded_digests(out_dir: Path, spec: dict[str, Any]) -> dict[str, set[str]]:
    """Image file → the sha256s that manifests made with exactly `spec` record for it.

    Every manifest in manifests/ counts, of any shard count, finished or partial; one that is
    unreadable or not a manifest vouches for nothing (its images are then simply made again).
    """
    recorded: dict[str, set[str]] = {}
    for path in sorted((Path(out_dir) / "manifests").glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(manifest, dict) or _spec_of(manifest) != spec:
            continue
        images = manifest.get("images")
        for entry in images if isinstance(images, list) else []:
            if isinstance(entry, dict):
                file, digest = entry.get("file"), entry.get("sha256")
                if isinstance(file, str) and isinstance(digest, str):
                    recorded.setdefault(file, set()).add(digest)
    return recorded


def gather_manifests(out_dir: Path, shards: int = 1) -> Path:
    """Merge the manifests of shards 0..shards−1 into `manifest.json`.

    Only `shard-iii-of-<shards>.json` are read, so manifests of other shard counts or older
    runs are ignored; those read must share one spec, cover every prompt, and every image file
    must still have the sha256 its shard recorded (a re-run or half-written image is caught).
    """
    out_dir = Path(out_dir)
    if shards < 1:
        raise InputError(f"--shards: expected a positive integer, got {shards}")
    paths = [shard_manifest(out_dir, i, shards) for i in range(shards)]
    missing = [(i, path) for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        i, path = missing[0]
        more = (
            f"; {len(missing) - 1} more of the {shards} shards missing" if len(missing) > 1 else ""
        )
        raise InputError(
            f"{path}: shard manifest not found (run `srpo sample --shard {i}/{shards}`){more}"
        )
    manifests = [_read_shard(path, i, shards) for i, path in enumerate(paths)]
    spec = _spec_of(manifests[0])
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        if _spec_of(manifest) != spec:
            names = (f"in {paths[0].name}", "here")
            difference = _first_difference(spec, _spec_of(manifest), names)
            raise InputError(
                f"{path}: made differently from {paths[0].name} ({difference}); "
                "run every shard with the same settings and model"
            )
    recorded = {
        entry["prompt_id"]: (entry, path)
        for path, manifest in zip(paths, manifests, strict=True)
        for entry in manifest["images"]
    }
    expected = spec["prompts"]["count"]
    if len(recorded) != expected:
        raise InputError(
            f"{out_dir / 'manifests'}: the {shards} shard manifests hold images of "
            f"{len(recorded)} of the {expected} prompts"
        )
    images = [_checked_image(out_dir, *recorded[key]) for key in sorted(recorded)]
    provenances = [
        {"manifest": path.name, **manifest["provenance"]}
        for path, manifest in zip(paths, manifests, strict=True)
    ]
    gathered = gathered_manifest(out_dir)
    clear_staging([gathered])
    write_json(gathered, {**spec, "images": images, "provenance": provenances})
    return gathered


def read_sample_manifest(sample_dir: Path) -> list[SampledImage]:
    """The images of a gathered `srpo sample` folder, in prompt order, each checked against
    its recorded sha256 (a hand-made manifest may leave it out)."""
    sample_dir = Path(sample_dir)
    manifest = gathered_manifest(sample_dir)
    if not manifest.is_file():
        raise InputError(f"{manifest}: sample manifest not found (run `srpo gather-samples`)")
    try:
        entries = json.loads(manifest.read_text())["images"]
        images = [
            SampledImage(
                int(e["prompt_id"]),
                str(e["style"]),
                str(e["prompt"]),
                sample_dir / e["file"],
                None if e.get("sha256") is None else str(e["sha256"]),
            )
            for e in entries
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise InputError(f"{manifest}: not a valid sample manifest ({error!r})") from None
    for image in images:
        fault = _image_fault(image.path, image.sha256)
        if fault == "missing":
            raise InputError(f"{image.path}: image listed in {manifest} is missing")
        if fault == "changed":
            raise InputError(
                f"{image.path}: expected the image with the sha256 recorded in {manifest} "
                "(half-written or replaced: run `srpo sample` and `srpo gather-samples` again)"
            )
    return sorted(images, key=lambda image: image.prompt_id)


def model_record(sample_dir: Path) -> dict[str, Any] | None:
    """The model a gathered folder was sampled with (base model, transformer sha256s); None
    for a folder without manifest.json."""
    manifest = gathered_manifest(sample_dir)
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("model", {})


def _image_fault(path: Path, sha256: str | None) -> str | None:
    """'missing', 'changed' (bytes other than the recorded sha256) or None for a good image."""
    if not path.is_file():
        return "missing"
    if sha256 is not None and sha256_file(path) != sha256:
        return "changed"
    return None


def _checked_image(out_dir: Path, entry: dict[str, Any], manifest: Path) -> dict[str, Any]:
    path = out_dir / entry["file"]
    fault = _image_fault(path, entry["sha256"])
    if fault == "missing":
        raise InputError(f"{path}: image of {manifest.name} missing (run its shard again)")
    if fault == "changed":
        raise InputError(f"{path}: image differs from {manifest.name} (run its shard again)")
    return entry


def _read_shard(path: Path, index: int, count: int) -> dict[str, Any]:
    shard = _read_json(path, "shard manifest")
    well_formed = (
        isinstance(shard, dict)
        and {*SPEC_KEYS, "shard", "images", "provenance"} <= shard.keys()
        and shard["shard"] == {"index": index, "count": count}
        and isinstance(shard["prompts"], dict)
        and "count" in shard["prompts"]
        and isinstance(shard["images"], list)
        and all(isinstance(e, dict) and e.keys() >= ENTRY_KEYS for e in shard["images"])
    )
    if not well_formed:
        raise InputError(f"{path}: not the manifest of sample shard {index}/{count}")
    return shard


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable {what} ({one_line(error)})") from None


def _first_difference(
    first: Any, second: Any, names: tuple[str, str] = ("here", "now"), key: str = ""
) -> str:
    """`key: value-1 <names[0]>, value-2 <names[1]>` for the first differing (nested) key."""
    if isinstance(first, dict) and isinstance(second, dict):
        for name in sorted(set(first) | set(second)):
            if first.get(name) != second.get(name):
                return _first_difference(
                    first.get(name), second.get(name), names, f"{key}.{name}".strip(".")
                )
    return f"{key}: {first!r} {names[0]}, {second!r} {names[1]}"
