"""Batch scoring: read a table or files, append predictions, write a table or files.

    spark-submit jobs/batch_score.py --config conf/batch.toml \
        [--input PATH | --input-table NAME] [--where SQL] [--output PATH | --output-table NAME] \
        [--mode errorifexists|overwrite|append] [--model FILE] \
        [--max-error-rate 0.01] [--quarantine PATH] [--member-outputs]

Every input row comes out once: good rows with a prediction, bad rows with a
null prediction and a reason in ``error``. The job prints how many rows were
scored and how many had errors, and exits with one sentence on stderr and
status 2 on a user mistake or when the error rate passes ``--max-error-rate``.
The pieces it composes live in ``udfs.batch``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace

# spark-submit puts only this file's folder on sys.path; the packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udfs.batch import BatchConfig, Summary
from udfs.config import from_dict, load_toml
from udfs.errors import ConfigError, SparkscoreError
from udfs.spec import ResolvedModel, with_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="batch_score.py", description="Score a table or files with a PyTorch model."
    )
    p.add_argument("--config", required=True, help="TOML config (see conf/batch.toml)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", help="input path (replaces [input])")
    source.add_argument("--input-table", help="input catalog table (replaces [input])")
    p.add_argument("--where", help="SQL filter on the input (replaces [input].where)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--output", help="output path (replaces [output].path / table)")
    target.add_argument("--output-table", help="output catalog table (replaces [output].path / table)")
    p.add_argument(
        "--model", help="model file or URI, e.g. models:/ctr@champion or s3://... (overrides [model].path)"
    )
    p.add_argument(
        "--mode",
        choices=["errorifexists", "overwrite", "append", "merge"],
        help="write mode (default errorifexists; overwrite replaces only the partitions written; "
        "merge upserts by [output] merge_on, Delta only)",
    )
    p.add_argument(
        "--incremental",
        action="store_true",
        help="score only the rows the Delta input gained since the last run ([input] checkpoint)",
    )
    p.add_argument("--checkpoint", help="where an incremental run keeps its progress ([input] checkpoint)")
    p.add_argument("--remote", help="run through a Spark Connect server, e.g. sc://127.0.0.1:15002")
    p.add_argument("--max-error-rate", type=float, help="fail when more than this fraction of rows are bad")
    p.add_argument("--quarantine", help="also write the bad rows, with their reasons, here")
    p.add_argument(
        "--member-outputs", action="store_true", help="ensembles: add each member's prediction as a column"
    )
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> BatchConfig:
    """The config file with command-line overrides applied."""
    cfg = from_dict(BatchConfig, load_toml(args.config), where="batch config")
    inp, out, job = cfg.input, cfg.output, cfg.job
    try:
        if args.input:
            inp = replace(inp, table=None, path=args.input)
        elif args.input_table:
            inp = replace(inp, table=args.input_table, path=None, format=None, options={}, schema=None)
        if args.where is not None:
            inp = replace(inp, where=args.where or None)
        if args.incremental or args.checkpoint:
            inp = replace(
                inp,
                incremental=inp.incremental or args.incremental,
                checkpoint=args.checkpoint or inp.checkpoint,
            )
        if args.output:
            out = replace(out, table=None, path=args.output)
        elif args.output_table:
            out = replace(out, table=args.output_table, path=None, options={})
        if args.mode:
            out = replace(out, mode=args.mode)
        if args.max_error_rate is not None:
            job = replace(job, max_error_rate=args.max_error_rate)
        if args.quarantine:
            job = replace(job, quarantine=args.quarantine)
    except ValueError as exc:
        raise ConfigError(f"command line: {exc}") from None
    model = with_overrides(cfg.model, path=args.model, member_outputs=args.member_outputs or None)
    try:
        return replace(cfg, model=model, input=inp, output=out, job=job)
    except ValueError as exc:
        raise ConfigError(f"command line: {exc}") from None


def run(cfg: BatchConfig, *, remote: str | None = None) -> Summary:
    """Score ``cfg.input`` into ``cfg.output``; returns the run's counts. ``remote``: a Spark Connect
    URL (``sc://host:port``): the run then uses no SparkContext, accumulator or JVM gateway."""
    from udfs.batch import check_local_paths, check_output_target, observe_rows, read_input, write_scored
    from udfs.core import check_input, check_model, output_schema
    from udfs.session import build_session
    from udfs.spark import (
        BISECT_CALLS,
        MODEL_ERRORS,
        check_device,
        check_keep_columns,
        feature_schema,
        model_load_tracker,
        session_time_zone,
        ship_model_files,
        with_predictions,
    )
    from udfs.spec import resolve

    started = time.monotonic()
    check_local_paths(cfg)
    model = resolve(cfg.model)
    # A model that does not load or does not fit its config is refused before Spark starts.
    check_model(model)
    if remote:
        from udfs.session import connect_session

        spark = connect_session(remote, cfg.spark, arrow_batch_rows=cfg.job.arrow_batch_rows)
    else:
        spark = build_session(
            "sparkscore-batch", cfg.spark, arrow_batch_rows=cfg.job.arrow_batch_rows, delta=cfg.uses_delta
        )
    if cfg.uses_delta:
        from udfs import delta

        delta.check_session(spark)

    # Everything a run can be refused for is checked before a row of data is read.
    df = read_input(spark, cfg.input)
    features = feature_schema(df.schema, model.spec.columns, session_time_zone(df))
    check_input(features, model)
    keep = list(cfg.output.keep_columns) or list(df.columns)
    # Checked here too: in quarantine mode the transform keeps every column, so it would not.
    check_keep_columns(df.schema, model, keep)
    predictions = output_schema(model).names
    check_output_target(spark, cfg.output, [*keep, *predictions])
    shipped = ship_model_files(spark, model)
    device = check_device(spark, model)
    what = f"ensemble of {len(model.members)} ({cfg.model.combiner})" if model.is_ensemble else model.format
    print(
        f"[sparkscore] model {model.name} version {model.version} ({what}: {model_source(model)}) on {device}",
        flush=True,
    )
    if shipped:
        print(f"[sparkscore] shipped to the executors: {', '.join(shipped)}", flush=True)
    print(f"[sparkscore] scoring {cfg.input.describe} into {cfg.output.describe}", flush=True)
    startup = time.monotonic() - started

    tracker = model_load_tracker(df)
    batches = None
    if cfg.input.incremental:
        from udfs import incremental

        incremental.check_checkpoint(spark, cfg)
        new_rows = incremental.read_new_rows(spark, cfg)
        scored = new_rows.transform(with_predictions(model, keep=keep, tracker=tracker))
        written, batches = incremental.score_new_rows(scored, cfg, columns=[*keep, *predictions])
    else:
        df, read = observe_rows(df)
        # Quarantined rows carry every input column, so the transform keeps them all in that case.
        scored = df.transform(
            with_predictions(model, keep=None if cfg.job.quarantine else keep, tracker=tracker)
        )
        written = write_scored(scored, cfg, columns=[*keep, *predictions], read=read)
    loads: dict[str, int] = dict(tracker.value) if tracker is not None else {}
    return Summary(
        input_rows=written.input_rows,
        output_rows=written.output_rows,
        scored=written.output_rows - written.errors,
        errors=written.errors,
        startup_seconds=startup,
        scoring_seconds=written.seconds,
        model_loads={k: v for k, v in loads.items() if k not in (MODEL_ERRORS, BISECT_CALLS)},
        model_errors=loads.get(MODEL_ERRORS, 0),
        bisect_calls=loads.get(BISECT_CALLS, 0),
        model_version=model.version,
        model_source=model_source(model),
        incremental_batches=batches,
    )


def model_source(model: ResolvedModel) -> str:
    """Where each member came from: a file path, or a store URI with the version it resolved to."""
    return ", ".join(m.store.describe if m.store is not None else m.path for m in model.members)


def report_error(message: str) -> None:
    """One line on stderr. Under spark-submit, Python's stderr is merged into stdout by Spark's
    PythonRunner, so the line goes through the JVM's System.err instead."""
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        try:
            from pyspark import SparkContext

            SparkContext._ensure_initialized()
            err = SparkContext._gateway.jvm.System.err  # type: ignore[union-attr]
            err.println(message)
            err.flush()
            return
        except Exception:  # noqa: BLE001 - no JVM to talk to: fall back to Python's stderr
            pass
    print(message, file=sys.stderr, flush=True)


def quiet_query_context_logs() -> None:
    """PySpark logs every analysis error it raises as a JSON line on stderr; the job reports it as one
    sentence instead."""
    from pyspark.logger import PySparkLogger

    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_query_context_logs()
    try:
        cfg = load_config(args)
        summary = run(cfg, remote=args.remote)
    except SparkscoreError as exc:
        report_error(f"[sparkscore] error: {exc}")
        return 2
    print(summary.render(), flush=True)
    print(f"[sparkscore] predictions written to {cfg.output.describe}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
