"""Collectives get tensors on the context's device. NCCL refuses host tensors, gloo does not, so
on the CPU a host tensor would pass unseen: here every collective of a run checks that none of
its tensors was made by a factory call that named no device (those stay on the host whatever
the run's device), and that each is on the context's device. The run is in this process, a
world of one, so the checks see every call the trainer and the bench worker make."""

import signal
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import yaml
from support import TRAIN_PROMPTS, tiny_config
from torch.overrides import TorchFunctionMode

from srpo.config import load_train_config
from srpo.encode import encode_prompts

pytestmark = pytest.mark.distributed

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty,
    torch.arange, torch.rand, torch.randn,
}  # fmt: skip
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
    "reduce_scatter_tensor", "all_to_all_single",
)  # fmt: skip


class HostTensors(TorchFunctionMode):
    """Remembers each tensor a factory made without being told a device."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, weakref.ref] = {}  # by identity: tensors compare by value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None:
            self.made[id(result)] = weakref.ref(result)
        return result

    def made_here(self, tensor: torch.Tensor) -> bool:
        ref = self.made.get(id(tensor))
        return ref is not None and ref() is tensor


class Audit:
    """The collectives seen, and what was wrong with their tensors."""

    def __init__(self, host: HostTensors, device: torch.device) -> None:
        self.host, self.device = host, device
        self.calls: list[str] = []
        self.faults: list[str] = []

    def check(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append(name)
        for value in [*args, *kwargs.values()]:
            tensors = value if isinstance(value, list | tuple) else [value]
            for tensor in tensors:
                if not isinstance(tensor, torch.Tensor):
                    continue
                if self.host.made_here(tensor):
                    self.faults.append(f"{name}: a tensor made without a device")
                elif tensor.device != self.device:
                    self.faults.append(f"{name}: a tensor on {tensor.device}, not {self.device}")


@pytest.fixture
def audit(monkeypatch) -> Iterator[Audit]:
    """Every collective of torch.distributed checked while the test runs."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    with HostTensors() as host:
        seen = Audit(host, torch.device("cpu"))  # the context's device without a GPU

        def checked(name, collective):
            def call(*args, **kwargs):
                seen.check(name, args, kwargs)
                return collective(*args, **kwargs)

            return call

        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
        yield seen
    for number, handler in handlers.items():  # the trainer's stop handlers
        signal.signal(number, handler)


@pytest.fixture
def watched_config(tiny_models, tiny_cache, tmp_path):
    """Two steps with a checkpoint each, a held-out evaluation at steps 0 and 2."""
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS[:2]) + "\n")
    held_out = encode_prompts(str(tiny_models / "flux"), prompts, tmp_path / "held-out", 32, 4)
    pickscore = {"pickscore": {"model_path": str(tiny_models / "pickscore")}}
    evaluation = {"every": 2, "embeddings": str(held_out), "steps": 2, "metrics": pickscore}
    config = tiny_config(
        tiny_models, tiny_cache, tmp_path / "run", max_steps=2, checkpoint_every=1,
        evaluation=evaluation,
    )  # fmt: skip
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_training_collectives_get_device_tensors(watched_config, audit):
    from srpo.train.run import train

    result = train(load_train_config(watched_config))
    assert result.step == 2
    assert audit.faults == []
    assert {"all_reduce", "broadcast"} <= set(audit.calls)


def test_bench_worker_collectives_get_device_tensors(watched_config, audit, tmp_path):
    from benchmarks.train_step import run

    run("ours", watched_config, tmp_path / "bench.json", 0, 1, 1)
    assert audit.faults == []
    assert "all_reduce" in audit.calls
