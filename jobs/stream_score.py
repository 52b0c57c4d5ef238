"""Streaming inference: Kafka events (or a Delta table) in, predictions (Kafka or Delta) out, window stats.

    SPARK_LOCAL_IP=127.0.0.1 spark-submit [--jars 'build/jars/*.jar'] \
        jobs/stream_score.py --config conf/stream.toml \
        [--bootstrap-servers HOST:PORT] [--checkpoint PATH] [--source auto|kafka|kafka_py] \
        [--model FILE] [--member-outputs] [--available-now] [--duration SECONDS]

Events ``{user_id, features, timestamp}`` are parsed by the schema in
``[events]``, scored by the same core as the batch job, and written to the
output topic keyed by ``user_id`` as ``{user_id, prediction, timestamp,
model_version}``; a message that does not parse or has bad features goes to
the dead-letter topic with its original bytes and the reason. Output is
effectively once across crashes and restarts on the same checkpoint (see
``streaming/sink.py``). With Spark's JVM Kafka connector on the classpath
(``--jars 'build/jars/*.jar'`` after ``make jars``; on a cluster ``--packages
org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0``) the source is
``format("kafka")``; without it, the Python source ``kafka_py``. An ensemble's
records also carry ``degraded`` and ``missing_members`` (a member failed and the
quorum answered), and with ``--member-outputs`` each member's prediction.

``[output] kind = "delta"`` writes the predictions to a Delta table instead,
exactly once (``streaming/delta_sink.py``: idempotent ``foreachBatch`` appends
with ``txnAppId`` / ``txnVersion``), the dead letters to the Kafka topic or a
Delta table of their own; ``[input] kind = "delta"`` reads a Delta table's new
rows instead of a topic (``streaming/delta_source.py``). Delta's jars come from
``make jars`` (a plain ``python`` run) or ``--packages io.delta:delta-spark_2.13:4.4.0``.

``--available-now`` drains what is in the topic and exits (then runs the
statistics query the same way; a missing input topic is an error unless
``[input] allow_missing_topic``); otherwise the job runs until stopped
(Ctrl-C / SIGTERM, to ``spark-submit`` or to this process: the queries stop
between micro-batches, the summary is printed, exit 0) or for ``--duration``
seconds. Exit 2: a usage or config mistake; exit 1: the run failed (a lost
broker, lost data, a write that failed), with one sentence saying why.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

# spark-submit puts only this file's folder on sys.path; the packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streaming.config import StreamConfig
from streaming.query import QueryFailed
from udfs.config import from_dict, load_toml
from udfs.errors import ConfigError, SparkscoreError
from udfs.spec import with_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="stream_score.py", description="Score a Kafka topic with a PyTorch model."
    )
    p.add_argument("--config", required=True, help="TOML config (see conf/stream.toml)")
    p.add_argument("--bootstrap-servers", help="Kafka brokers (overrides [kafka].bootstrap_servers)")
    p.add_argument("--checkpoint", help="checkpoint folder (overrides [job].checkpoint)")
    p.add_argument("--source", choices=["auto", "kafka", "kafka_py"], help="Kafka source backend")
    p.add_argument("--model", help="model file (overrides [model].path)")
    p.add_argument(
        "--member-outputs", action="store_true", help="ensembles: add each member's prediction to the record"
    )
    p.add_argument("--available-now", action="store_true", help="process what is in the topic, then exit")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> StreamConfig:
    """The config file with command-line overrides applied."""
    cfg = from_dict(StreamConfig, load_toml(args.config), where="stream config")
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    kafka = replace(
        cfg.kafka,
        bootstrap_servers=args.bootstrap_servers or cfg.kafka.bootstrap_servers,
        source=args.source or cfg.kafka.source,
    )
    job = replace(cfg.job, checkpoint=args.checkpoint or cfg.job.checkpoint)
    return replace(
        cfg,
        kafka=kafka,
        job=job,
        model=with_overrides(cfg.model, path=args.model, member_outputs=args.member_outputs or None),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
        from streaming.query import SPARK_DEFAULTS, run
        from udfs.core import check_model
        from udfs.session import build_session
        from udfs.spec import resolve

        model = resolve(cfg.model)
        check_model(model)
        print(
            f"[sparkscore] model {model.name} version {model.version} "
            f"({', '.join(m.store.describe if m.store else m.path for m in model.members)})",
            flush=True,
        )
        from streaming.backends import launch_jvm

        spark_conf = dict(cfg.spark)
        if (
            cfg.uses_delta
            and "spark.jars.packages" not in spark_conf
            and "PYSPARK_GATEWAY_PORT" not in os.environ
        ):
            # A plain `python` run that uses Delta starts its JVM with Delta's jars from `make jars`
            # (under spark-submit the JVM runs already: its --packages / --jars count).
            from udfs.delta import local_delta_jars

            jars = [j for j in spark_conf.get("spark.jars", "").split(",") if j]
            spark_conf["spark.jars"] = ",".join(dict.fromkeys(jars + local_delta_jars()))
        launch_jvm(spark_conf)  # [spark] "spark.jars" must be on the JVM's class path from its start
        spark = build_session("sparkscore-stream", {**SPARK_DEFAULTS, **spark_conf}, delta=cfg.uses_delta)
        summary = run(spark, cfg, model, available_now=args.available_now, duration_s=args.duration)
    except SparkscoreError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2
    except QueryFailed as exc:
        # Not a usage mistake: the broker went away, data was lost, a write failed.
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(summary.render(cfg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
