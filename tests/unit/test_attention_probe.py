"""The attention-kernel probe: its cases run, and its verdicts say what to switch off."""

import pytest
import torch

from benchmarks.attention_probe import CASES, TOLERANCE, _one, verdicts


@pytest.mark.parametrize("case", CASES)
def test_each_case_runs_forward_and_backward(case):
    """The tiny size on the CPU's math kernel: a finite gradient reaches the input."""
    result = _one(case, "tiny", "math", torch.device("cpu"))
    assert result["finite"] and result["input_grad_norm"] > 0


def test_verdicts():
    math = {"finite": True, "input_grad_norm": 10.0}
    rows = verdicts(
        "flux-block",
        {
            "flash": {"finite": True, "input_grad_norm": 10.0 * (1 + TOLERANCE / 2)},
            "efficient": {"finite": False, "input_grad_norm": float("inf")},
            "cudnn": {"error": "exit -6: CUDA error: an illegal memory access was encountered"},
            "math": math,
        },
    )
    assert {row["kernel"]: row["broken"] for row in rows} == {
        "flash": False, "efficient": True, "cudnn": True, "math": False,
    }  # fmt: skip
    off = verdicts(
        "vae-mid-block", {"flash": {"finite": True, "input_grad_norm": 11.0}, "math": math}
    )
    assert off[0]["broken"]
    missing = verdicts(
        "vae-mid-block",
        {"cudnn": {"error": "exit 1: RuntimeError: No viable backend for sdpa"}, "math": math},
    )
    assert not missing[0]["broken"]
