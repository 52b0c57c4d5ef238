"""The stream job's model between micro-batches: ``[job] model_refresh_s`` re-resolves the model.

With a refresh interval the scoring runs inside each micro-batch (``foreachBatch``) with the model
:meth:`ModelRefresher.for_batch` chooses, on the driver, before the batch's tasks start:

* at most once per ``model_refresh_s`` the configured path is looked at again (for a ``models:/``
  alias: one registry call, and a download only when the alias points elsewhere); a new version
  is loaded and checked on the driver's CPU and applies from this batch on, whole batches only;
* a registry outage keeps the current version and says so at most once a minute;
* a new version that fails its check, or whose prediction columns differ, is not used (logged);
* a batch that a crashed run had partly written is scored with the version that run recorded in
  its writer markers (``BatchPlan.model``), so the replay writes the same predictions.

Each record's ``model_version`` says which version scored it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

from udfs import model_store
from udfs.core import check_model, output_schema
from udfs.errors import ModelLoadError, SparkscoreError
from udfs.spec import ModelSpec, ResolvedModel, resolve

log = logging.getLogger(__name__)
OUTAGE_LOG_INTERVAL_S = 60.0


def pinned_uri(model: ResolvedModel) -> str:
    """A path that names exactly this model: ``models:/name/N`` for a registry version, else its path."""
    ref = model.members[0].store
    if ref is not None and ref.registry_name and ref.registry_version:
        return f"models:/{ref.registry_name}/{ref.registry_version}"
    return model.members[0].path


def record_of(model: ResolvedModel) -> str:
    """What a writer marker records of the model that scored a batch (JSON: path and version)."""
    return json.dumps({"path": pinned_uri(model), "version": model.version}, sort_keys=True)


class ModelRefresher:
    """Chooses the model for each micro-batch (driver side)."""

    def __init__(self, spec: ModelSpec, model: ResolvedModel, refresh_s: float) -> None:
        self.spec = spec
        self.current = model
        self.refresh_s = refresh_s
        self._checked = time.monotonic()
        self._outage_logged = 0.0
        self._refused = ""  # a version that failed its check: not tried again until the alias moves
        self.changes = 0

    def for_batch(self, batch_id: int, recorded: str = "") -> ResolvedModel:
        """The model to score ``batch_id`` with; ``recorded``: what a crashed run's writer markers say."""
        if recorded:
            return self._replay(batch_id, recorded)
        now = time.monotonic()
        if now - self._checked < self.refresh_s:
            return self.current
        self._checked = now
        try:
            if not self._moved():
                return self.current
            new = resolve(self.spec)
        except SparkscoreError as exc:
            if now - self._outage_logged >= OUTAGE_LOG_INTERVAL_S:
                self._outage_logged = now
                print(
                    f"[sparkscore] batch {batch_id}: cannot refresh the model ({exc}); version "
                    f"{self.current.version} keeps scoring",
                    flush=True,
                )
            return self.current
        if new.content_hash == self.current.content_hash or new.version == self._refused:
            return self.current
        try:
            check_model(new)
            if output_schema(new) != output_schema(self.current):
                raise ModelLoadError(
                    f"its prediction columns {output_schema(new).names} differ from the running version's "
                    f"{output_schema(self.current).names}; restart the job to change them"
                )
        except SparkscoreError as exc:
            self._refused = new.version
            print(
                f"[sparkscore] batch {batch_id}: model version {new.version} is not used ({exc}); "
                f"{self.current.version} keeps scoring",
                flush=True,
            )
            return self.current
        print(
            f"[sparkscore] batch {batch_id}: model version {new.version} replaces {self.current.version}",
            flush=True,
        )
        self.current = new
        self.changes += 1
        return new

    def _moved(self) -> bool:
        """Whether the configured path may name other content now (a registry alias: one lookup)."""
        ref = self.current.members[0].store
        path = self.spec.path or ""
        if ref is None or not ref.registry_version or not path.startswith(("models:/", "runs:/")):
            return True  # a file or an object: resolve (hash) it again
        version, location = model_store.peek(path, self.spec.registry_uri)
        return (version, location) != (ref.registry_version, ref.location)

    def _replay(self, batch_id: int, recorded: str) -> ResolvedModel:
        d = json.loads(recorded)
        if d.get("version") == self.current.version:
            return self.current
        model = resolve(replace(self.spec, path=d["path"], version=None))
        if model.version != d["version"]:
            raise ModelLoadError(
                f"batch {batch_id} was partly written with model version {d['version']} ({d['path']}), which "
                f"now resolves to {model.version}; restore that version so the replay writes the same predictions"
            )
        print(
            f"[sparkscore] batch {batch_id}: replayed with model version {model.version}, the one its "
            "first attempt recorded",
            flush=True,
        )
        return model
