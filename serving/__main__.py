"""Real-time scorer: micro-batched HTTP scoring over the same core as the Spark jobs.

    python -m serving --config conf/serve.toml \
        [--host 127.0.0.1] [--port 8080] [--redis-url redis://127.0.0.1:6379/0] [--model FILE] \
        [--workers N|auto]

Without a Redis URL it runs embedded: an in-process prediction cache, and
requests carry their own features. With one, Redis holds the prediction cache
and the ``user:{id}`` / ``item:{id}`` feature hashes. The model is checked
before the port opens (a bad config or model exits 2 with one sentence), then
loaded and warmed up while ``/v2/health/ready`` answers 503. With more than one
worker, a supervisor holds the port and runs that many server processes on it
(see :mod:`serving.workers`). SIGTERM drains: readiness false, no new
connections, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from udfs.errors import SparkscoreError

WORKER_FLAGS = ("--worker-fd", "--worker-index", "--worker-dir")


def workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description="Real-time scorer (HTTP, KServe v2).")
    p.add_argument("--config", required=True, help="TOML config (see conf/serve.toml)")
    p.add_argument("--host", help="address to bind (default [server].host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default [server].port, 8080)")
    p.add_argument("--redis-url", help="Redis for features and the prediction cache (overrides [redis].url)")
    p.add_argument("--model", help="model file (overrides [model].path)")
    p.add_argument(
        "--workers",
        type=workers_arg,
        help="server processes on the port (default [server].workers; auto = cores)",
    )
    # Set by the supervisor for the processes it starts.
    p.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        from serving.config import load_config
        from udfs.core import check_model
        from udfs.spec import resolve

        cfg = load_config(
            args.config,
            host=args.host,
            port=args.port,
            redis_url=args.redis_url,
            model_path=args.model,
            workers=args.workers,
        )
        token = cfg.auth_token()
        model = resolve(cfg.model)
        if args.worker_fd is None:
            check_model(model)
            if cfg.candidate is not None:
                check_model(resolve(cfg.candidate.model))
    except SparkscoreError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2

    logging.basicConfig(
        level=cfg.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from serving.app import create_app
    from serving.workers import Peers, Supervisor, run_server

    if args.worker_fd is not None:  # one of the supervisor's workers
        index = args.worker_index
        # The first worker polls a followed registry alias and loads a new version in the others.
        options: dict[str, Any] = {"worker": str(index), "follow_leader": index == 0}
        app = create_app(
            cfg, model=model, token=token, peers=Peers(args.worker_dir, index), service_options=options
        )
        run_server(app, cfg, fd=args.worker_fd)
        return 0

    server = cfg.server
    if server.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(
            f"[sparkscore] warning: binding {server.host} without a bearer token (set [server].auth_token_env)",
            file=sys.stderr,
            flush=True,
        )
    count = cfg.worker_count()
    store = cfg.redis.url or "embedded (in-process cache, features in requests)"
    supervisor = None
    port = server.port
    if count > 1:
        try:
            supervisor = Supervisor(cfg, [a for a in argv if not a.startswith(WORKER_FLAGS)], count)
        except OSError as exc:
            print(f"[sparkscore] error: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr)
            return 2
        port = supervisor.port
    candidate = ""
    if cfg.candidate is not None:
        c = cfg.candidate
        candidate = f"; candidate {'shadow' if c.shadow else f'canary {c.traffic:g}'}"
    print(
        f"[sparkscore] serving {model.name} version {model.version} on http://{server.host}:{port} "
        f"(batch <= {cfg.batcher.max_batch_size}, wait <= {cfg.batcher.max_wait_ms:g} ms; store: {store}; "
        f"workers: {count}{candidate})",
        flush=True,
    )
    if supervisor is not None:
        return supervisor.run()
    run_server(create_app(cfg, model=model, token=token), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
