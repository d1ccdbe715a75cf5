"""The collapse guard's rule, the eval log across resumes, the `evaluation` config checks, and
the held-out sampling's batches on the tiny models."""

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from srpo.config import EvaluationConfig, load_train_config
from srpo.encode import encode_prompts
from srpo.flux import FrozenVAE, LatentGeometry, load_transformer, load_vae, vae_scale_factor
from srpo.io import InputError
from srpo.rewards import load_reward
from srpo.runtime.distributed import DistributedContext
from srpo.runtime.precision import POLICIES
from srpo.train.evaluate import EvalLog, Evaluation, HeldOutEvaluator, collapse_reason


def history(*rows: tuple[int, float, float]) -> list[Evaluation]:
    """(step, training reward, aesthetic) rows."""
    return [Evaluation(step, reward, {"aesthetic": value}) for step, reward, value in rows]


def test_a_drop_beyond_the_margin_while_the_reward_rises_is_collapse():
    # best aesthetic 5.0 at step 2 (reward 0.30); now 4.7: drop 0.3 > 0.2, reward 0.35 > 0.30
    reason = collapse_reason(
        history((0, 0.2, 4.9), (2, 0.3, 5.0), (4, 0.35, 4.7)), {"aesthetic": 0.2}
    )
    assert reason is not None
    assert reason.startswith(
        "aesthetic fell from 5 (step 2) to 4.7 (step 4), more than its margin 0.2"
    )
    assert reason.endswith("rose from 0.3 to 0.35")


@pytest.mark.parametrize(
    "rows, why",
    [
        (((0, 0.2, 5.0), (2, 0.35, 4.85)), "a drop of 0.15 is within the margin 0.2"),
        (((0, 0.2, 5.0), (2, 0.2, 4.0)), "the reward did not rise (0.2 = 0.2): no hacking"),
        (((0, 0.4, 5.0), (2, 0.1, 4.0)), "both fell: the run got worse, not gamed"),
        (((0, 0.2, 5.0),), "one evaluation has nothing to compare with"),
    ],
)
def test_no_collapse(rows, why):
    assert collapse_reason(history(*rows), {"aesthetic": 0.2}) is None, why


def test_the_best_earlier_evaluation_is_the_reference():
    # against step 0 (4.0) the drop is 0; against the best, step 2 (5.0), it is 0.5
    rows = history((0, 0.1, 4.0), (2, 0.2, 5.0), (4, 0.3, 4.5))
    assert "from 5 (step 2) to 4.5 (step 4)" in collapse_reason(rows, {"aesthetic": 0.4})


def test_eval_log_keeps_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "eval.csv"
    log = EvalLog(path, 0, ["aesthetic"])
    for step, reward, value in ((0, 0.1, 4.0), (2, 0.2, 4.1), (4, 0.3, 4.2)):
        log.append(Evaluation(step, reward, {"aesthetic": value}).row(3))
    resumed = EvalLog(path, 2, ["aesthetic"])
    assert [e.step for e in resumed.history] == [0, 2]
    assert resumed.has(2) and not resumed.has(4)
    assert resumed.history[1] == Evaluation(2, 0.2, {"aesthetic": 4.1})
    assert EvalLog(path, 0, ["aesthetic"]).history == [], "a fresh run starts a fresh log"
    assert len(pd.read_csv(path)) == 3, "reading does not rewrite the file"


def test_eval_log_of_other_metrics_is_refused(tmp_path):
    path = tmp_path / "eval.csv"
    EvalLog(path, 0, ["aesthetic"]).append(Evaluation(0, 0.1, {"aesthetic": 4.0}).row(3))
    with pytest.raises(InputError, match=r"eval.csv: lacks column\(s\) \['pickscore'\]"):
        EvalLog(path, 2, ["aesthetic", "pickscore"])


def write(tmp_path, evaluation: dict, reward: dict | None = None):
    config = {"base_model": "m", "embeddings": "e", "output_dir": "o", "evaluation": evaluation}
    if reward is not None:
        config["reward"] = reward
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"every": 2, "metrics": {"aesthetic": {}}}, "evaluation: embeddings: required when"),
        ({"every": 2, "embeddings": "e"}, "evaluation: metrics: name at least one metric"),
        ({"metrics": {"clipscore": {}}}, "evaluation: metrics.clipscore: unknown metric"),
        (
            {"metrics": {"aesthetic": {}}, "collapse": {"margins": {"pickscore": 0.1}}},
            "evaluation: collapse.margins.pickscore: not a watched metric",
        ),
        (
            {"metrics": {"aesthetic": {}}, "collapse": {"margins": {"aesthetic": 0}}},
            "evaluation.collapse.margins: aesthetic: expected a margin > 0",
        ),
        ({"every": -1}, "evaluation.every: Input should be greater than or equal to 0"),
    ],
)
def test_bad_evaluation_config_is_one_line(tmp_path, evaluation, message):
    with pytest.raises(InputError) as error:
        load_train_config(write(tmp_path, evaluation))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_watched_metric_made_of_the_reward_files_is_refused(tmp_path):
    checkpoint, model_config = tmp_path / "HPS.pt", tmp_path / "config.json"
    checkpoint.write_bytes(b"weights")
    model_config.write_text("{}")
    files = {"checkpoint": str(checkpoint), "model_config": str(model_config)}
    reward = {
        "kind": "hpsv2",
        "checkpoint": str(checkpoint),
        "model_config_path": str(model_config),
    }
    with pytest.raises(InputError, match=r"metrics\.hpsv2: its files are the training reward"):
        load_train_config(write(tmp_path, {"metrics": {"hpsv2": files}}, reward))
    judge = tmp_path / "judge.pt"
    judge.write_bytes(b"other weights")
    files["checkpoint"] = str(judge)  # a judge sharing only the architecture JSON is fine
    load_train_config(write(tmp_path, {"metrics": {"hpsv2": files}}, reward))


HELD_OUT = [
    "a cat sleeping on a sofa",
    "a castle in the clouds",
    "a robot playing chess",
    "a red bicycle by a lake",
    "an owl reading a book",
]


@dataclass
class HeldOutParts:
    """What a trainer hands the evaluator, built once from the tiny models."""

    embeddings: Path
    metric_paths: dict[str, str]
    transformer: torch.nn.Module
    vae: FrozenVAE
    reward: torch.nn.Module
    geometry: LatentGeometry


@pytest.fixture(scope="module")
def held_out_parts(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> HeldOutParts:
    folder = tmp_path_factory.mktemp("held_out")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    flux = str(tiny_models / "flux")
    embeddings = encode_prompts(flux, prompts, folder / "embeddings", 32, 4)
    vae = load_vae(flux)
    geometry = LatentGeometry(64, 64, vae_scale_factor(vae))
    reward = load_reward(
        "hpsv2",
        checkpoint=tiny_models / "hpsv2" / "HPS_v2.1_compressed.pt",
        model_config=tiny_models / "hpsv2" / "open_clip_config.json",
    )
    return HeldOutParts(
        embeddings,
        {"model_path": str(tiny_models / "pickscore")},
        load_transformer(flux).eval(),
        FrozenVAE(vae, geometry),
        reward,
        geometry,
    )


def held_out_evaluation(
    parts: HeldOutParts, ctx: DistributedContext, batch_size: int
) -> tuple[Evaluation, list[int]]:
    """The evaluation at step 0 and the batch of every transformer call it made."""
    config = EvaluationConfig(
        every=1,
        embeddings=str(parts.embeddings),
        steps=2,
        metrics={"pickscore": parts.metric_paths},
        batch_size=batch_size,
    )
    evaluator = HeldOutEvaluator(
        config,
        ctx,
        parts.reward,
        parts.vae,
        parts.geometry,
        POLICIES["fp32"],
        3.0,
        bool(parts.transformer.config.guidance_embeds),
    )
    batches: list[int] = []

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        batches.append(kwargs["hidden_states"].shape[0])

    hook = parts.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        evaluation, _ = evaluator(parts.transformer, 0)
    finally:
        hook.remove()
    return evaluation, batches


def assert_same_figures(got: Evaluation, want: Evaluation) -> None:
    """Equal up to the last bits of batched matmuls; the metrics score 8-bit pictures, where
    such a difference can move a pixel by one level, hence their looser tolerance."""
    assert got.reward == pytest.approx(want.reward, rel=1e-5)
    assert got.metrics == pytest.approx(want.metrics, rel=1e-4)


def test_held_out_sampling_runs_in_batches_of_batch_size(held_out_parts: HeldOutParts):
    """Five prompts at batch_size 2: the transformer never sees more than two, and the means
    are those of sampling all five at once (each prompt keeps its own noise)."""
    with DistributedContext.from_environment() as ctx:
        whole, whole_batches = held_out_evaluation(held_out_parts, ctx, len(HELD_OUT))
        chunked, batches = held_out_evaluation(held_out_parts, ctx, 2)
    assert whole_batches == [5, 5], "two Euler steps over one batch of five"
    assert batches == [2, 2, 2, 2, 1, 1], "each chunk's two steps, chunk after chunk"
    assert_same_figures(chunked, whole)


def test_every_rank_makes_the_same_transformer_calls(held_out_parts: HeldOutParts):
    """Ranks 0 and 1 of two (prompts 0, 2, 4 and 1, 3 padded to three): the same calls on
    both, since a sharded forward is collective; their sums add up to a world of one's."""
    with DistributedContext.from_environment() as ctx:
        alone, _ = held_out_evaluation(held_out_parts, ctx, 2)
        ranks = [
            held_out_evaluation(held_out_parts, replace(ctx, rank=rank, world_size=2), 2)
            for rank in (0, 1)
        ]
    (first, first_batches), (second, second_batches) = ranks
    assert first_batches == second_batches == [2, 2, 1, 1]
    # a world of one all-reduces nothing: each rank's mean is its own sum over all five
    together = Evaluation(
        0,
        first.reward + second.reward,
        {name: first.metrics[name] + second.metrics[name] for name in first.metrics},
    )
    assert_same_figures(together, alone)
