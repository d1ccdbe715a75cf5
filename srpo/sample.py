"""Evaluation sampling (SPEC §2 step 4, §4): the stock FluxPipeline, fixed seeds, any sharding.

Each image's seed depends only on (seed, prompt_id), batches are cut from the global prompt order
and shard i of n takes batches i, i+n, …, so every sharding writes byte-identical PNGs. The
folder's layout and its manifests are srpo.sample_manifest's.

There is no folder-wide record: a shard keeps an existing image only if a manifest (final or
progress, of any shard count) made with the same spec records its sha256, and makes every other
image of its own prompts again. So a stopped shard resumes after its last finished batch, even
when Snakemake deleted its manifest before the re-run; a shard re-run with other settings or
another model replaces its images; and shards, which own disjoint prompts, never write the same
file. Every file is written atomically, and a re-run removes the staging folders a killed run left
beside its own files, so a run killed anywhere and run again leaves the same bytes as one that
never stopped.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import track

from srpo.io import (
    InputError,
    atomic_path,
    clear_staging,
    file_hashes,
    one_line,
    provenance,
    sha256_file,
)
from srpo.prompts import EvalPrompt, read_eval_prompts
from srpo.runtime.precision import DTYPES
from srpo.runtime.seeds import derive_seed
from srpo.sample_manifest import (
    gathered_manifest,
    image_entry,
    image_file,
    make_spec,
    progress_manifest,
    recorded_digests,
    shard_manifest,
    write_progress,
    write_shard,
)

STATE_DICT_SUFFIX = ".safetensors"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class SettingError(InputError):
    """A bad `SampleSettings` field: the message names the field, and `setting` lets a front
    end (the CLI's flags) name it in its own terms."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True)
class SampleSettings:
    """Sampling settings; the defaults are the paper's evaluation protocol (SPEC §4)."""

    steps: int = 50
    guidance: float = 3.5
    height: int = 1024
    width: int = 1024
    max_sequence_length: int = 512
    seed: int = 42
    batch_size: int = 1
    dtype: str | None = None  # None: bfloat16 on a GPU, float32 on the CPU

    def validate(self) -> None:
        """Reject values the pipeline would silently change (FLUX rounds sizes to 16 px)."""
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_sequence_length": self.max_sequence_length,
        }
        for setting, value in positive.items():
            if value < 1:
                raise SettingError(setting, f"expected a positive integer, got {value}")
        for setting, value in {"height": self.height, "width": self.width}.items():
            if value < 16 or value % 16:
                raise SettingError(setting, f"expected a positive multiple of 16, got {value}")
        if self.max_sequence_length > 512:
            raise SettingError(
                "max_sequence_length",
                f"expected at most 512 (FLUX's T5 limit), got {self.max_sequence_length}",
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SettingError("dtype", f"expected one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class SampleResult:
    manifest: Path
    generated: int
    skipped: int
    replaced: int  # of the generated: files that were there but incomplete or made differently
    seconds: float

    def summary(self) -> str:
        replaced = f" (replacing {self.replaced} stale or incomplete)" if self.replaced else ""
        return (
            f"generated {self.generated}{replaced}, skipped {self.skipped} existing images "
            f"in {self.seconds:.1f} s; wrote {self.manifest}"
        )


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` → (i, n) with 0 ≤ i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or int(match[1]) >= int(match[2]):
        raise InputError(f"--shard: expected i/n with 0 ≤ i < n (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def prompt_seed(seed: int, prompt_id: int) -> int:
    return derive_seed(seed, "sample", prompt_id)


def shard_batches(
    prompts: Sequence[EvalPrompt], batch_size: int, shard: int, shards: int
) -> list[list[EvalPrompt]]:
    """Batches i, i+n, … of the global order: a batch's members never depend on the sharding
    (batched matmuls are not bitwise batch-invariant, so this is what keeps PNGs identical)."""
    batches = [list(prompts[k : k + batch_size]) for k in range(0, len(prompts), batch_size)]
    return batches[shard::shards]


def is_complete_image(path: Path, width: int, height: int) -> bool:
    """True if `path` is a whole PNG of the expected size.

    PIL alone decodes a file that lost its last bytes, so the IEND trailer and every chunk's
    CRC are checked before the pixels are decoded.
    """
    try:
        data = path.read_bytes()
        if not data.endswith(PNG_END):
            return False
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size == (width, height)
    except (OSError, SyntaxError, ValueError):
        return False


def write_png(image: Image.Image, path: Path) -> None:
    """Write atomically; PIL adds no time or text chunks, so equal pixels give equal bytes."""
    with atomic_path(path) as staged:
        image.save(staged, format="PNG")


def model_identity(base_model: str, transformer: Path | None) -> dict[str, Any]:
    """Base model and the sha256 of the transformer weights that make the images.

    A hub id (no local folder) is recorded by name only.
    """
    if transformer is not None:
        if not transformer.exists():
            raise InputError(f"{transformer}: transformer not found")
        if transformer.is_file() and transformer.suffix != STATE_DICT_SUFFIX:
            raise InputError(
                f"{transformer}: expected a {STATE_DICT_SUFFIX} state dict or a diffusers "
                "transformer folder"
            )
        weights: Path | None = transformer.resolve()
    else:
        local = Path(base_model) / "transformer"
        weights = local.resolve() if local.is_dir() else None
    base = Path(base_model)
    return {
        "base_model": str(base.resolve()) if base.exists() else base_model,
        "transformer": None if transformer is None else str(transformer.resolve()),
        "sha256": {} if weights is None else file_hashes(weights),
    }


def load_pipeline(
    base_model: str, transformer: Path | None, dtype: torch.dtype, device: torch.device
) -> Any:
    """The stock FluxPipeline, with the transformer replaced as the released SRPO model does."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    parts = {}
    if transformer is not None and transformer.is_dir():
        try:
            parts["transformer"] = FluxTransformer2DModel.from_pretrained(transformer, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise InputError(
                f"{transformer}: not a diffusers FLUX transformer folder ({one_line(error)})"
            ) from None
    try:
        pipe = FluxPipeline.from_pretrained(base_model, dtype=dtype, **parts)
    except (OSError, ValueError) as error:
        raise InputError(f"{base_model}: cannot load a FLUX pipeline ({one_line(error)})") from None
    if transformer is not None and transformer.is_file():
        try:
            pipe.transformer.load_state_dict(load_file(transformer))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise InputError(
                f"{transformer}: not a state dict of {base_model}'s transformer ({one_line(error)})"
            ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe: Any, batch: Sequence[EvalPrompt], settings: SampleSettings) -> list[Image.Image]:
    """One pipeline call; one CPU generator per image, so noise is independent of the batch."""
    generators = [
        torch.Generator().manual_seed(prompt_seed(settings.seed, p.prompt_id)) for p in batch
    ]
    return pipe(
        prompt=[p.prompt for p in batch],
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        max_sequence_length=settings.max_sequence_length,
        generator=generators,
    ).images


def sample_images(
    base_model: str,
    prompts: Path,
    out_dir: Path,
    settings: SampleSettings | None = None,
    transformer: Path | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str | None = None,
    progress: bool = True,
) -> SampleResult:
    """Sample shard `shard` = (i, n) of the prompt file into `out_dir`.

    An image is kept only if it is complete and a manifest made with the same spec (settings,
    model, prompts) records its sha256; every other image of this shard is made again and
    overwritten, so a folder never mixes settings or models. Only this shard's images, its
    manifests and the now outdated manifest.json are written, so shards can run in parallel.
    The pipeline is loaded only if some image must be made.
    """
    start = time.perf_counter()
    settings = settings or SampleSettings()
    settings.validate()
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard: expected i/n with 0 ≤ i < n, got {index}/{count}")
    prompts, out_dir = Path(prompts), Path(out_dir)
    transformer = None if transformer is None else Path(transformer)
    prompt_list = read_eval_prompts(prompts)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = settings.dtype or ("bfloat16" if target.type == "cuda" else "float32")
    spec = make_spec(
        settings={**asdict(settings), "dtype": dtype, "device": target.type},
        model=model_identity(base_model, transformer),
        prompts={"sha256": sha256_file(prompts), "count": len(prompt_list)},
    )
    config = {
        "base_model": base_model,
        "transformer": None if transformer is None else str(transformer),
        "prompt_file": str(prompts),
        "out_dir": str(out_dir),
        "shard": f"{index}/{count}",
        "settings": asdict(settings),
    }
    made_by = provenance(config)  # before any compute: a bad SOURCE_DATE_EPOCH fails fast
    batches = shard_batches(prompt_list, settings.batch_size, index, count)
    own = [p for batch in batches for p in batch]
    digests = _verified_images(out_dir, own, spec, (settings.width, settings.height))
    todo = [batch for batch in batches if any(p.prompt_id not in digests for p in batch)]
    stale = sum(_png(out_dir, p).exists() for p in own if p.prompt_id not in digests)
    skipped = len(digests)
    pipe = load_pipeline(base_model, transformer, DTYPES[dtype], target) if todo else None
    manifest = shard_manifest(out_dir, index, count)
    clear_staging(
        [manifest, progress_manifest(out_dir, index, count), *(_png(out_dir, p) for p in own)]
    )

    def record_progress() -> None:
        made = [
            _entry(p, settings.seed, digests[p.prompt_id]) for p in own if p.prompt_id in digests
        ]
        write_progress(out_dir, spec, index, count, made)

    record_progress()  # vouches for the kept images even once `manifest` is gone
    if todo:  # from the first image written, these describe a folder that no longer exists
        manifest.unlink(missing_ok=True)
        gathered_manifest(out_dir).unlink(missing_ok=True)
    for batch in track(todo, description=f"sampling shard {index}/{count}", disable=not progress):
        for prompt, image in zip(batch, generate(pipe, batch, settings), strict=True):
            if prompt.prompt_id not in digests:
                write_png(image, _png(out_dir, prompt))
                digests[prompt.prompt_id] = sha256_file(_png(out_dir, prompt))
        record_progress()  # a stopped shard resumes after its last finished batch
    entries = [_entry(p, settings.seed, digests[p.prompt_id]) for p in own]
    write_shard(out_dir, spec, index, count, entries, made_by)
    generated = len(entries) - skipped
    return SampleResult(manifest, generated, skipped, stale, time.perf_counter() - start)


def _verified_images(
    out_dir: Path, own: Sequence[EvalPrompt], spec: dict[str, Any], size: tuple[int, int]
) -> dict[int, str]:
    """prompt_id → sha256 of this shard's images that can be kept: complete, right size, and
    recorded with that sha256 by a manifest made with the same spec."""
    recorded = recorded_digests(out_dir, spec)
    kept = {}
    for prompt in own:
        path = _png(out_dir, prompt)
        digests = recorded.get(image_file(prompt.prompt_id), set())
        if digests and is_complete_image(path, *size):
            digest = sha256_file(path)
            if digest in digests:
                kept[prompt.prompt_id] = digest
    return kept


def _png(out_dir: Path, prompt: EvalPrompt) -> Path:
    return out_dir / image_file(prompt.prompt_id)


def _entry(prompt: EvalPrompt, seed: int, digest: str) -> dict[str, Any]:
    return image_entry(prompt, prompt_seed(seed, prompt.prompt_id), digest)
