"""The text-embedding cache: FLUX conditioning computed once, so the trainer never loads T5.

Layout of a cache folder:
    index.json                       prompts, shard table, settings, encoder hashes
    shard-00000-of-00002.safetensors prompt_embeds [n, L, D], pooled_prompt_embeds [n, P],
                                     text_ids [L, 3], index [n] (prompt numbers)
Each rank of a torchrun launch encodes one contiguous chunk of the prompt list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from srpo.io import InputError, atomic_path, file_hashes, read_prompt_file, write_json
from srpo.prompts import read_eval_prompts

INDEX_NAME = "index.json"
CACHE_FORMAT = 1


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous chunk; chunk sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


@torch.no_grad()
def encode_shard(
    base_model: str,
    prompts: Sequence[str],
    out_file: Path,
    start: int,
    max_sequence_length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> None:
    """Encode prompts[start:] chunk with FLUX's own `encode_prompt` (text-only pipeline)."""
    from diffusers import FluxPipeline
    from rich.progress import track

    pipe = FluxPipeline.from_pretrained(base_model, transformer=None, vae=None, dtype=dtype)
    pipe.to(device)
    embeds, pooled, text_ids = [], [], None
    batches = range(0, len(prompts), batch_size)
    for offset in track(batches, description="encoding prompts", disable=not progress):
        chunk = list(prompts[offset : offset + batch_size])
        prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(
            chunk, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        embeds.append(prompt_embeds.cpu())
        pooled.append(pooled_embeds.cpu())
    tensors = {
        "prompt_embeds": torch.cat(embeds),
        "pooled_prompt_embeds": torch.cat(pooled),
        "text_ids": text_ids.cpu(),
        "index": torch.arange(start, start + len(prompts), dtype=torch.int64),
    }
    with atomic_path(out_file) as staged:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staged))


def write_index(
    out_dir: Path, prompts: Sequence[str], world_size: int, base_model: str, settings: dict
) -> Path:
    """The cache's table of contents, written last so a cache with an index is complete."""
    shards = []
    for rank in range(world_size):
        start, stop = shard_bounds(len(prompts), rank, world_size)
        shards.append({"file": shard_name(rank, world_size), "start": start, "stop": stop})
    encoders = {}
    base = Path(base_model)
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if (base / part).is_dir():
            encoders[part] = file_hashes(base / part)
    index = {
        "format": CACHE_FORMAT,
        "base_model": base_model,
        "prompts": list(prompts),
        "shards": shards,
        "settings": settings,
        "encoders": encoders,
        "shard_hashes": {s["file"]: file_hashes(out_dir / s["file"])[s["file"]] for s in shards},
    }
    write_json(out_dir / INDEX_NAME, index)
    return out_dir / INDEX_NAME


def encode_prompts(
    base_model: str,
    prompt_file: Path,
    out_dir: Path,
    max_sequence_length: int = 512,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode a prompt file into `out_dir`, one shard per rank of the current launch."""
    from srpo.runtime.distributed import DistributedContext

    if Path(prompt_file).suffix.lower() == ".csv":  # the evaluation set, held out in training
        prompts = [prompt.prompt for prompt in read_eval_prompts(prompt_file)]
    else:
        prompts = read_prompt_file(prompt_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with DistributedContext.from_environment() as ctx:
        if len(prompts) < ctx.world_size:
            raise InputError(
                f"{prompt_file}: {len(prompts)} prompts for {ctx.world_size} processes; "
                "expected at least one prompt per process"
            )
        start, stop = shard_bounds(len(prompts), ctx.rank, ctx.world_size)
        encode_shard(
            base_model,
            prompts[start:stop],
            out_dir / shard_name(ctx.rank, ctx.world_size),
            start,
            max_sequence_length,
            batch_size,
            ctx.device,
            dtype,
            progress=ctx.is_main,
        )
        ctx.barrier()
        if ctx.is_main:
            settings = {"max_sequence_length": max_sequence_length, "dtype": str(dtype)}
            write_index(out_dir, prompts, ctx.world_size, base_model, settings)
        ctx.barrier()
    return out_dir / INDEX_NAME


@dataclass(frozen=True)
class Conditioning:
    """FLUX text conditioning of a batch of prompts."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled_prompt_embeds: torch.Tensor  # [B, P]
    text_ids: torch.Tensor  # [L, 3]
    captions: list[str]

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        return Conditioning(
            self.prompt_embeds.to(device, dtype),
            self.pooled_prompt_embeds.to(device, dtype),
            self.text_ids.to(device, dtype),
            self.captions,
        )


class EmbeddingCache:
    """Read access to a cache written by `encode_prompts`, one prompt at a time (lazy)."""

    def __init__(self, index_path: Path) -> None:
        index_path = Path(index_path)
        if index_path.is_dir():
            index_path = index_path / INDEX_NAME
        if not index_path.is_file():
            raise InputError(f"{index_path}: embedding cache index not found (run `srpo encode`)")
        try:
            index = json.loads(index_path.read_text())
            self.prompts: list[str] = index["prompts"]
            shards = index["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{index_path}: not a valid cache index ({error})") from None
        self.index_path = index_path
        self.settings: dict = index.get("settings", {})
        self._shards = []
        for shard in shards:
            path = index_path.parent / shard["file"]
            if not path.is_file():
                raise InputError(f"{path}: cache shard listed in {index_path} is missing")
            self._shards.append((int(shard["start"]), int(shard["stop"]), path))

    def __len__(self) -> int:
        return len(self.prompts)

    def _locate(self, number: int) -> tuple[Path, int]:
        for start, stop, path in self._shards:
            if start <= number < stop:
                return path, number - start
        raise IndexError(f"prompt {number} is not in cache {self.index_path}")

    def get(self, numbers: Sequence[int]) -> Conditioning:
        embeds, pooled, text_ids = [], [], None
        for number in numbers:
            path, row = self._locate(number)
            try:
                with safe_open(str(path), framework="pt") as shard:
                    embeds.append(shard.get_slice("prompt_embeds")[row : row + 1])
                    pooled.append(shard.get_slice("pooled_prompt_embeds")[row : row + 1])
                    text_ids = shard.get_tensor("text_ids")
            except Exception as error:  # safetensors raises several unrelated types
                raise InputError(f"{path}: unreadable cache shard ({error})") from None
        return Conditioning(
            torch.cat(embeds), torch.cat(pooled), text_ids, [self.prompts[n] for n in numbers]
        )
