"""PySpark's Python worker daemon, deaf to Ctrl-C (``spark.python.daemon.module = streaming.daemon``).

Ctrl-C in a terminal signals the whole foreground process group: the ``spark-submit``
JVM, the Python driver, and the worker daemon and workers the JVM started. PySpark's
daemon dies of the SIGINT (and its shutdown sends SIGHUP to the process group) and its
workers raise ``KeyboardInterrupt`` mid-task, so the running micro-batch fails instead of
finishing. The stream job stops between batches on its own (``streaming.query.run``);
the workers only have to let the current batch finish: this daemon ignores SIGINT and
keeps the forked workers from turning it back on. Everything else is PySpark's daemon.
"""

from __future__ import annotations

import signal
import types
from typing import Any

import pyspark.daemon as pyspark_daemon


def _deaf_to_sigint() -> types.SimpleNamespace:
    """``signal`` as pyspark.daemon uses it, except that SIGINT stays ignored."""

    def set_handler(signum: int, handler: Any) -> Any:
        if signum == signal.SIGINT:
            return signal.getsignal(signum)
        return signal.signal(signum, handler)

    return types.SimpleNamespace(**{**vars(signal), "signal": set_handler})


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pyspark_daemon.signal = _deaf_to_sigint()  # type: ignore[assignment]
    pyspark_daemon.manager()


if __name__ == "__main__":
    main()
