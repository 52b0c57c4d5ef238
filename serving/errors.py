"""Request failures, each with the HTTP status it is answered with."""

from __future__ import annotations


class RequestError(Exception):
    """A failure answered with ``status`` and ``{"error": message}``."""

    status = 500
    reason = "error"  # label of the failure metric
    retry_after: int | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(RequestError):
    """Malformed JSON (400), wrong types, wrong lengths or bad feature values (422)."""

    status = 422
    reason = "bad_input"


class NotFound(RequestError):
    status = 404
    reason = "not_found"


class MethodNotAllowed(RequestError):
    """A known route asked with the wrong method; ``allow`` is the one it takes."""

    status = 405
    reason = "method"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class Unauthorized(RequestError):
    status = 401
    reason = "unauthorized"


class BodyTooLarge(RequestError):
    status = 413
    reason = "too_large"


class QueueFull(RequestError):
    status = 429
    reason = "queue_full"
    retry_after = 1


class DeadlineExceeded(RequestError):
    status = 504
    reason = "deadline"


class NotReady(RequestError):
    status = 503
    reason = "not_ready"
    retry_after = 1


class StoreUnavailable(RequestError):
    """The feature store cannot be read and the request carries no features."""

    status = 503
    reason = "feature_store"
    retry_after = 1


class BatchFailed(RequestError):
    """The model raised on a micro-batch: every request in it gets this."""

    status = 500
    reason = "backend"


class ClientGone(RequestError):
    """The client disconnected while its request was queued (nginx's 499; nobody reads it)."""

    status = 499
    reason = "canceled"


class RequestTimeout(RequestError):
    """The body did not arrive within ``[server] body_timeout_s``."""

    status = 408
    reason = "body_timeout"


class LoadFailed(RequestError):
    """A new model version could not be loaded; the old one keeps serving."""

    status = 400
    reason = "load_failed"
