"""Batch scoring: read a Parquet table, append predictions, write Parquet.

    spark-submit jobs/batch_score.py --config conf/batch.toml \
        [--input PATH] [--output PATH] [--model FILE] [--mode overwrite|errorifexists] \
        [--max-error-rate 0.01] [--quarantine PATH] [--member-outputs]

Every input row comes out once: good rows with a prediction, bad rows with a
null prediction and a reason in ``error``. The job prints how many rows were
scored and how many had errors, and exits non-zero with one sentence on a
user mistake (exit 2) or when the error rate passes ``--max-error-rate``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

# spark-submit puts only this file's folder on sys.path; the packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udfs.config import from_dict, load_toml
from udfs.errors import (
    ConfigError,
    ErrorRateExceeded,
    InputPathError,
    OutputExistsError,
    SparkscoreError,
)
from udfs.spec import ModelSpec, with_overrides

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


@dataclass(frozen=True)
class InputConfig:
    path: str
    format: Literal["parquet"] = "parquet"


@dataclass(frozen=True)
class OutputConfig:
    path: str
    mode: Literal["errorifexists", "overwrite"] = "errorifexists"
    # Input columns carried into the output; empty means all of them.
    keep_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobConfig:
    max_error_rate: float | None = None
    quarantine: str | None = None

    def __post_init__(self) -> None:
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be between 0 and 1, got {self.max_error_rate}")


@dataclass(frozen=True)
class BatchConfig:
    model: ModelSpec
    input: InputConfig
    output: OutputConfig
    job: JobConfig = JobConfig()
    spark: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    input_rows: int
    output_rows: int
    scored: int
    errors: int
    seconds: float
    model_loads: dict[str, int]

    @property
    def error_rate(self) -> float:
        return self.errors / self.input_rows if self.input_rows else 0.0

    def render(self) -> str:
        workers = len(self.model_loads)
        loads = sum(self.model_loads.values())
        rate = self.input_rows / self.seconds if self.seconds else 0.0
        return (
            f"[sparkscore] rows in: {self.input_rows:,}  out: {self.output_rows:,}  "
            f"scored: {self.scored:,}  errors: {self.errors:,} ({self.error_rate:.2%})\n"
            f"[sparkscore] model loads: {loads} across {workers} Python worker(s)  "
            f"time: {self.seconds:.1f} s  ({rate:,.0f} rows/s)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batch_score.py", description="Score a Parquet table with a PyTorch model."
    )
    p.add_argument("--config", required=True, help="TOML config (see conf/batch.toml)")
    p.add_argument("--input", help="input Parquet path (overrides [input].path)")
    p.add_argument("--output", help="output path (overrides [output].path)")
    p.add_argument("--model", help="model file (overrides [model].path)")
    p.add_argument(
        "--mode", choices=["overwrite", "errorifexists"], help="write mode (default errorifexists)"
    )
    p.add_argument("--max-error-rate", type=float, help="fail when more than this fraction of rows are bad")
    p.add_argument("--quarantine", help="also write the bad rows, with their reasons, here")
    p.add_argument(
        "--member-outputs", action="store_true", help="ensembles: add each member's prediction as a column"
    )
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> BatchConfig:
    """The config file with command-line overrides applied."""
    cfg = from_dict(BatchConfig, load_toml(args.config), where="batch config")
    job = cfg.job
    if args.max_error_rate is not None or args.quarantine is not None:
        try:
            job = JobConfig(
                max_error_rate=args.max_error_rate if args.max_error_rate is not None else job.max_error_rate,
                quarantine=args.quarantine or job.quarantine,
            )
        except ValueError as exc:
            raise ConfigError(f"--max-error-rate: {exc}") from None
    return replace(
        cfg,
        model=with_overrides(cfg.model, path=args.model, member_outputs=args.member_outputs or None),
        input=replace(cfg.input, path=args.input or cfg.input.path),
        output=replace(cfg.output, path=args.output or cfg.output.path, mode=args.mode or cfg.output.mode),
        job=job,
    )


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def check_paths(cfg: BatchConfig) -> None:
    """Fail before Spark starts on an input that is not there or an output that would be clobbered."""
    if _is_local(cfg.input.path) and not os.path.exists(cfg.input.path.removeprefix("file://")):
        raise InputPathError(f"input path {cfg.input.path!r} does not exist")
    if (
        cfg.output.mode == "errorifexists"
        and _is_local(cfg.output.path)
        and os.path.exists(cfg.output.path.removeprefix("file://"))
    ):
        raise OutputExistsError(
            f"output path {cfg.output.path!r} already exists; pass --mode overwrite or choose another path"
        )


def run(cfg: BatchConfig) -> Summary:
    """Score ``cfg.input`` into ``cfg.output``; returns the run's counts."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    from udfs.core import check_model, output_schema
    from udfs.session import build_session
    from udfs.spark import model_load_tracker, with_predictions
    from udfs.spec import resolve

    check_paths(cfg)
    model = resolve(cfg.model)
    check_model(model)
    what = f"ensemble of {len(model.members)} ({cfg.model.combiner})" if model.is_ensemble else model.format
    print(
        f"[sparkscore] model {model.name} version {model.version} ({what}: {', '.join(model.spec.paths)})",
        flush=True,
    )

    started = time.monotonic()
    spark = build_session("sparkscore-batch", cfg.spark, arrow_batch_rows=cfg.model.batch_size)
    try:
        df = spark.read.parquet(cfg.input.path)
    except AnalysisException as exc:
        raise InputPathError(
            f"input path {cfg.input.path!r} cannot be read as Parquet: {exc.getMessage()}"
        ) from None
    input_rows = df.count()
    print(f"[sparkscore] scoring {input_rows:,} rows from {cfg.input.path}", flush=True)

    tracker = model_load_tracker(df)
    keep = list(cfg.output.keep_columns) or None
    # Quarantined rows carry every input column, so the transform keeps them all in that case.
    scored = df.transform(with_predictions(model, keep=None if cfg.job.quarantine else keep, tracker=tracker))
    output = scored.select(*keep, *output_schema(model).names) if keep and cfg.job.quarantine else scored
    writer_mode = "overwrite" if cfg.output.mode == "overwrite" else "errorifexists"
    has_error = F.col("error").isNotNull()

    if cfg.job.max_error_rate is not None or cfg.job.quarantine:
        # Score once, keep the result, and decide on the error rate before anything is written.
        scored.persist()
        n, bad = _counts(scored)
        _check_error_rate(cfg, n, bad)
        output.write.mode(writer_mode).parquet(cfg.output.path)
        if cfg.job.quarantine:
            scored.filter(has_error).write.mode("overwrite").parquet(cfg.job.quarantine)
            print(f"[sparkscore] quarantined {bad:,} bad rows to {cfg.job.quarantine}", flush=True)
        scored.unpersist()
    else:
        output.write.mode(writer_mode).parquet(cfg.output.path)
        # Counted from what was committed, so the summary describes the table on disk.
        n, bad = _counts(spark.read.parquet(cfg.output.path))

    if n != input_rows:
        raise RuntimeError(
            f"output has {n:,} rows but the input has {input_rows:,}; the output is incomplete"
        )
    return Summary(
        input_rows=input_rows,
        output_rows=n,
        scored=n - bad,
        errors=bad,
        seconds=time.monotonic() - started,
        model_loads=dict(tracker.value),
    )


def _counts(df: DataFrame) -> tuple[int, int]:
    """(rows, rows with an error) in one aggregation."""
    from pyspark.sql import functions as F

    row = df.agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.col("error").isNotNull().cast("long")).alias("bad")
    ).first()
    assert row is not None  # a global aggregation always returns one row
    return int(row["n"]), int(row["bad"] or 0)


def _check_error_rate(cfg: BatchConfig, n: int, bad: int) -> None:
    limit = cfg.job.max_error_rate
    if limit is not None and n and bad / n > limit:
        raise ErrorRateExceeded(
            f"{bad:,} of {n:,} rows ({bad / n:.2%}) have bad features, above --max-error-rate "
            f"{limit:.2%}; nothing was written (use --quarantine PATH to inspect them)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
        summary = run(cfg)
    except SparkscoreError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(summary.render(), flush=True)
    print(f"[sparkscore] predictions written to {cfg.output.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
