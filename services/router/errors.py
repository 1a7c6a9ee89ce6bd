"""What can go wrong on the request path, each with its gRPC code and OpenAI error type and code.

The servicer turns any of these into a gRPC status plus the OpenAI error body that Envoy sends to
REST clients (see services/common/gateway.py). A RouterError is always the client's or the
system's fault in a way the message explains; anything else is a bug and becomes INTERNAL.
"""

from __future__ import annotations

import grpc


class RouterError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "server_error"
    error_code = "internal_error"
    # Retrying the same request on another backend may succeed (nothing reached the client yet).
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.error_code = code


class InvalidRequest(RouterError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    error_code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    error_code = "context_length_exceeded"


class ModelNotFound(RouterError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    error_code = "model_not_found"


class Overloaded(RouterError):
    """Every slot is busy and the queue is full: come back later (HTTP 429 with Retry-After)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    error_code = "overloaded"


class ModelUnavailable(RouterError):
    """No backend can serve the model right now (starting failed, FAILED, too big)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "server_error"
    error_code = "model_unavailable"


class BackendUnavailable(RouterError):
    """A backend could not be reached or answered 5xx before the first token."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "server_error"
    error_code = "backend_unavailable"
    retryable = True


class BackendTimeout(RouterError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "server_error"
    error_code = "backend_timeout"
    retryable = True


class StreamBroken(RouterError):
    """The backend failed after tokens were sent: the stream ends with an error event."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "server_error"
    error_code = "stream_interrupted"
