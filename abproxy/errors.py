"""Errors a user causes or can act on, raised by the services (feedback, results, flushes) and
turned into an answer at the edge: an HTTP status in OpenAI's error shape by the ASGI app
(:data:`abproxy.routes.HTTP_STATUS`), a message and an exit code by the CLI."""

from __future__ import annotations


class DomainError(Exception):
    code = "error"

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param


class InvalidRequest(DomainError):
    """The request is malformed (a missing field, a field of the wrong type)."""

    code = "invalid_request"


class InvalidValue(DomainError):
    """The request is well formed, but a value is not acceptable (a score out of range)."""

    code = "invalid_value"


class NotFound(DomainError):
    code = "not_found"


class Conflict(DomainError):
    code = "conflict"


class StoreUnavailable(DomainError):
    """Redis cannot be reached, or does not answer in time."""

    code = "store_unavailable"


class CorruptCounters(StoreUnavailable):
    """Redis holds a key of another type, or a counter that is no number, where a write must go:
    nothing was written (an operator has to mend or delete the key)."""

    code = "corrupt_counters"


class MlflowUnavailable(DomainError):
    code = "mlflow_unavailable"
