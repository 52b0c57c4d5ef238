"""Ensembles in the core: weighted mean, majority vote, derived versions, quorum and degradation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch

from udfs import model_cache
from udfs.config import from_dict
from udfs.core import QuorumError, load_scorer, score_batch
from udfs.errors import ConfigError
from udfs.spec import MemberSpec, ModelSpec, resolve

F = 5


class Slow(torch.nn.Module):
    """Seconds of matrix products per call: far past any member timeout used below."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(1024) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.sum(dim=1, keepdim=True).expand(x.shape[0], 1024).contiguous()
        for _ in range(300):
            y = y @ self.w
        return y[:, :1]


class Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("member exploded")


def save(module: torch.nn.Module, path, script: bool = True) -> str:
    torch.jit.save(torch.jit.script(module) if script else module, str(path))
    return str(path)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens")
    out = {}
    for i in range(3):
        torch.manual_seed(10 + i)
        reg = torch.nn.Sequential(torch.nn.Linear(F, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
        clf = torch.nn.Sequential(torch.nn.Linear(F, 3)).eval()
        out[f"reg{i}"] = (reg, save(reg, d / f"reg{i}.pt"))
        out[f"clf{i}"] = (clf, save(clf, d / f"clf{i}.pt"))
    out["broken"] = (None, save(Broken(), d / "broken.pt"))
    out["slow"] = (None, save(Slow(), d / "slow.pt"))
    return out


def batch_of(rows: np.ndarray) -> pa.RecordBatch:
    return pa.record_batch({"f": pa.array(rows.tolist(), pa.list_(pa.float32()))})


def run(module, rows) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(rows)).numpy()


ROWS = np.random.default_rng(4).normal(size=(16, F)).astype(np.float32)


def spec(members_, names, weights, **kw) -> ModelSpec:
    return ModelSpec(
        input_columns=("f",),
        num_features=F,
        name="ens",
        members=tuple(
            MemberSpec(path=members_[n][1], name=n, weight=w) for n, w in zip(names, weights, strict=True)
        ),
        **kw,
    )


def test_weighted_mean_of_scores_uses_normalised_weights(members):
    s = spec(members, ["reg0", "reg1", "reg2"], [2.0, 1.0, 1.0], member_outputs=True)
    out = score_batch(batch_of(ROWS), load_scorer(resolve(s)))
    parts = [run(members[n][0], ROWS).reshape(-1) for n in ("reg0", "reg1", "reg2")]
    expected = 0.5 * parts[0] + 0.25 * parts[1] + 0.25 * parts[2]
    np.testing.assert_allclose(out.column("prediction").to_numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.column("member_reg1").to_numpy(), parts[1], rtol=1e-6)
    assert not any(out.column("degraded").to_pylist())


def test_weighted_mean_of_probabilities_then_argmax(members):
    s = spec(members, ["clf0", "clf1"], [1.0, 3.0], output="probabilities", activation="softmax")
    out = score_batch(batch_of(ROWS), load_scorer(resolve(s)))
    sm = [torch.softmax(torch.from_numpy(run(members[n][0], ROWS)), -1).numpy() for n in ("clf0", "clf1")]
    probs = 0.25 * sm[0] + 0.75 * sm[1]
    np.testing.assert_allclose(np.array(out.column("probabilities").to_pylist()), probs, rtol=1e-5)
    assert out.column("label").to_pylist() == probs.argmax(1).tolist()


def test_majority_vote_breaks_ties_by_summed_weight_then_lowest_label():
    from udfs.core import combine
    from udfs.spec import ResolvedMember, ResolvedModel

    def onehot(labels):
        return np.eye(3, dtype=np.float32)[labels]

    def model(weights):
        ms = tuple(ResolvedMember(n, n, n, n, "torchscript", w) for n, w in zip("abc", weights, strict=True))
        s = ModelSpec(
            input_columns=("f",),
            members=tuple(MemberSpec(path=n, name=n) for n in "abc"),
            output="probabilities",
            combiner="majority_vote",
        )
        return ResolvedModel(spec=s, version="v", members=ms)

    outputs = {"a": onehot([2, 1, 0]), "b": onehot([2, 0, 2]), "c": onehot([1, 2, 1])}
    # row 0: two votes for 2 wins outright; row 1: 1/0/2 tie -> the heavier voter (c, 0.5) wins label 2;
    # row 2 with equal weights: a three-way tie -> lowest label 0.
    assert combine(model([0.25, 0.25, 0.5]), outputs).labels.tolist()[:2] == [2, 2]
    assert combine(model([1 / 3, 1 / 3, 1 / 3]), outputs).labels.tolist()[2] == 0


def test_version_is_derived_from_member_versions_and_weights(members):
    a = resolve(spec(members, ["reg0", "reg1"], [1.0, 1.0])).version
    b = resolve(spec(members, ["reg0", "reg1"], [1.0, 2.0])).version
    c = resolve(spec(members, ["reg0", "reg1"], [2.0, 2.0])).version  # same normalised weights as a
    assert a.startswith("ens-") and a != b and a == c


def test_each_member_is_loaded_once_per_process(members):
    model_cache.clear()
    scorer_spec = spec(members, ["reg0", "reg1", "reg2"], [1, 1, 1])
    for _ in range(4):
        score_batch(batch_of(ROWS), load_scorer(resolve(scorer_spec)))
    assert sorted(model_cache.stats().loads.values()) == [1, 1, 1]


def test_failing_member_is_dropped_above_quorum_and_weights_renormalise(members):
    s = spec(members, ["reg0", "broken", "reg1"], [1.0, 1.0, 3.0], quorum=2)
    out = score_batch(batch_of(ROWS), load_scorer(resolve(s)))
    expected = 0.25 * run(members["reg0"][0], ROWS).reshape(-1) + 0.75 * run(
        members["reg1"][0], ROWS
    ).reshape(-1)
    np.testing.assert_allclose(out.column("prediction").to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert set(out.column("degraded").to_pylist()) == {True}
    assert set(out.column("missing_members").to_pylist()) == {"broken"}


def test_below_quorum_fails_naming_the_member(members):
    s = spec(members, ["reg0", "broken"], [1.0, 1.0])
    with pytest.raises(
        QuorumError,
        match=r"1 of 2 members answered, quorum is 2; failing: broken \(.*RuntimeError: member exploded\)",
    ):
        score_batch(batch_of(ROWS), load_scorer(resolve(s)))


def test_member_over_its_timeout_is_dropped_when_run_in_parallel(members):
    s = spec(members, ["reg0", "slow", "reg1"], [1.0, 1.0, 1.0], quorum=2, member_timeout_ms=100)
    with ThreadPoolExecutor(3) as pool:
        out = score_batch(batch_of(ROWS), load_scorer(resolve(s)), pool=pool)
    assert set(out.column("missing_members").to_pylist()) == {"slow"}
    expected = (run(members["reg0"][0], ROWS) + run(members["reg1"][0], ROWS)).reshape(-1) / 2
    np.testing.assert_allclose(out.column("prediction").to_numpy(), expected, rtol=1e-6, atol=1e-7)


def test_parallel_and_sequential_members_give_identical_predictions(members):
    s = resolve(spec(members, ["reg0", "reg1", "reg2"], [1, 2, 3]))
    seq = score_batch(batch_of(ROWS), load_scorer(s))
    with ThreadPoolExecutor(3) as pool:
        par = score_batch(batch_of(ROWS), load_scorer(s), pool=pool)
    assert seq.equals(par)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"members": [{"path": "a.pt", "weight": 0.0}]}, "total weight must be positive"),
        ({"members": [{"path": "a.pt", "weight": -1.0}]}, "weights must be >= 0"),
        ({"members": [{"path": "a.pt"}], "path": "b.pt"}, "not both"),
        ({"members": [{"path": "a.pt"}], "combiner": "majority_vote"}, "set output = 'probabilities'"),
        ({"members": [{"path": "a.pt"}, {"path": "b.pt"}], "quorum": 3}, "quorum must be between 1 and 2"),
        ({"members": [{"path": "x/a.pt"}, {"path": "y/a.pt"}]}, "names must be unique"),
    ],
)
def test_bad_ensemble_configs_are_clear_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelSpec, {"input_columns": ["f"], **table}, where="model")


@pytest.mark.spark
def test_spark_scores_an_ensemble_in_one_pass_loading_each_member_once_per_worker(spark, members, tmp_path):
    from chispa import assert_approx_df_equality

    from udfs.spark import model_load_tracker, with_predictions

    # Fresh copies, so no earlier test in this process has them cached.
    names = ["reg0", "reg1", "reg2"]
    fresh = {}
    for i, n in enumerate(names):
        module = torch.nn.Sequential(torch.nn.Linear(F, 1))
        torch.manual_seed(100 + i)
        fresh[n] = (module, save(module, tmp_path / f"{n}.pt"))
    model = resolve(spec(fresh, names, [1.0, 2.0, 3.0], member_outputs=True))
    rows = np.random.default_rng(9).normal(size=(600, F)).astype(np.float32)
    df = spark.createDataFrame(
        [(i, r.tolist()) for i, r in enumerate(rows)], "id int, f array<float>"
    ).repartition(6)
    tracker = model_load_tracker(df)
    actual = df.transform(with_predictions(model, keep=["id"], tracker=tracker))
    core = score_batch(batch_of(rows), load_scorer(model))
    expected = spark.createDataFrame(
        pa.table(
            [pa.array(np.arange(600, dtype=np.int32)), *core.columns], names=["id", *core.schema.names]
        ).to_pandas(),
        schema=actual.schema,
    )
    assert_approx_df_equality(actual, expected, 1e-6, ignore_row_order=True, ignore_nullable=True)
    assert set(tracker.value.values()) == {3}  # three members, each loaded once per worker
