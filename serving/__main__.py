"""Real-time scorer: micro-batched HTTP scoring over the same core as the Spark jobs.

    python -m serving --config conf/serve.toml \
        [--host 127.0.0.1] [--port 8080] [--redis-url redis://127.0.0.1:6379/0] [--model FILE]

Without a Redis URL it runs embedded: an in-process prediction cache, and
requests carry their own features. With one, Redis holds the prediction cache
and the ``user:{id}`` / ``item:{id}`` feature hashes. The model is checked
before the port opens (a bad config or model exits 2 with one sentence), then
loaded and warmed up while ``/v2/health/ready`` answers 503.
"""

from __future__ import annotations

import argparse
import logging
import sys

from udfs.errors import SparkscoreError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description="Real-time scorer (HTTP, KServe v2).")
    p.add_argument("--config", required=True, help="TOML config (see conf/serve.toml)")
    p.add_argument("--host", help="address to bind (default [server].host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default [server].port, 8080)")
    p.add_argument("--redis-url", help="Redis for features and the prediction cache (overrides [redis].url)")
    p.add_argument("--model", help="model file (overrides [model].path)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from serving.config import load_config
        from udfs.core import check_model
        from udfs.spec import resolve

        cfg = load_config(
            args.config, host=args.host, port=args.port, redis_url=args.redis_url, model_path=args.model
        )
        token = cfg.auth_token()
        model = resolve(cfg.model)
        check_model(model)
    except SparkscoreError as exc:
        print(f"[sparkscore] error: {exc}", file=sys.stderr, flush=True)
        return 2

    import uvicorn

    from serving.app import create_app

    logging.basicConfig(
        level=cfg.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = cfg.server
    if server.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(
            f"[sparkscore] warning: binding {server.host} without a bearer token (set [server].auth_token_env)",
            file=sys.stderr,
            flush=True,
        )
    store = cfg.redis.url or "embedded (in-process cache, features in requests)"
    print(
        f"[sparkscore] serving {model.name} version {model.version} on http://{server.host}:{server.port} "
        f"(batch <= {cfg.batcher.max_batch_size}, wait <= {cfg.batcher.max_wait_ms:g} ms; store: {store})",
        flush=True,
    )
    uvicorn.run(
        create_app(cfg, model=model, token=token),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        # Loopback by default: no proxy to trust, and the Server/Date headers are per-request work nobody reads.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level=server.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
