"""Evaluation prompt files: a `prompt_id,style,prompt` CSV (HPDv2 benchmark) or a plain .txt.

Prompt ids name the image files and seed each image, so they must be unique, non-negative
integers that stay attached to their prompt when the file is re-ordered or split.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from srpo.io import InputError, read_prompt_file

CSV_COLUMNS = ("prompt_id", "style", "prompt")


@dataclass(frozen=True)
class EvalPrompt:
    prompt_id: int
    style: str
    prompt: str


def read_eval_prompts(path: Path) -> list[EvalPrompt]:
    """Read a .csv (header prompt_id,style,prompt; extra columns ignored) or a .txt prompt file.

    A .txt file gets ids 0..n−1 in line order and an empty style.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [EvalPrompt(i, "", text) for i, text in enumerate(read_prompt_file(path))]
    if suffix != ".csv":
        raise InputError(
            f"{path}: expected a .csv (prompt_id,style,prompt) or .txt (one prompt per line) file"
        )
    return _read_csv(path)


def _read_csv(path: Path) -> list[EvalPrompt]:
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: expected UTF-8 text, {error.reason} at byte {error.start}"
        ) from None
    except (OSError, csv.Error) as error:
        raise InputError(f"{path}: unreadable CSV ({error})") from None
    if not rows:
        raise InputError(f"{path}: empty file, expected a header {','.join(CSV_COLUMNS)}")
    header = rows[0][1]
    columns = _column_positions(path, header)
    prompts, first_line = [], {}
    for line, row in rows[1:]:
        prompt = _parse_row(path, line, row, len(header), columns)
        if prompt.prompt_id in first_line:
            raise InputError(
                f"{path}:{line}: duplicate prompt_id {prompt.prompt_id} "
                f"(first on line {first_line[prompt.prompt_id]})"
            )
        first_line[prompt.prompt_id] = line
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{path}: no prompts after the header")
    return prompts


def _column_positions(path: Path, header: list[str]) -> dict[str, int]:
    names = [name.strip() for name in header]
    for column in CSV_COLUMNS:
        if column not in names:
            raise InputError(
                f"{path}:1: missing column {column!r}, expected a header "
                f"{','.join(CSV_COLUMNS)} (got {','.join(names)})"
            )
    return {column: names.index(column) for column in CSV_COLUMNS}


def _parse_row(
    path: Path, line: int, row: list[str], width: int, columns: dict[str, int]
) -> EvalPrompt:
    """One data row; `line` is the file line it ends on (a quoted prompt may span lines)."""
    if not row:
        raise InputError(f"{path}:{line}: empty line, expected one prompt per row")
    if len(row) != width:
        raise InputError(f"{path}:{line}: expected {width} fields like the header, got {len(row)}")
    raw_id = row[columns["prompt_id"]].strip()
    if not (raw_id.isascii() and raw_id.isdigit()):
        raise InputError(
            f"{path}:{line}: column prompt_id: expected a non-negative integer, got {raw_id!r}"
        )
    prompt = row[columns["prompt"]].strip()
    if not prompt:
        raise InputError(f"{path}:{line}: column prompt: empty prompt")
    return EvalPrompt(int(raw_id), row[columns["style"]].strip(), prompt)
