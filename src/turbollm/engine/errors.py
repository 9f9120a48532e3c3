"""Errors the engine raises for bad requests (the server maps them to 4xx bodies)."""


class RequestValidationError(ValueError):
    """A request the engine cannot take; `param` names the offending field."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(RequestValidationError):
    code = "context_length_exceeded"


class ModelBrokenError(RuntimeError):
    """The model fails whatever it runs (after a failed step, a one-token probe failed too):
    the engine stops rather than failing every later request one step at a time."""


class KVCacheBusyError(RuntimeError):
    """Work outside the scheduler (scoring, embeddings) found too few free KV blocks: the
    running requests hold them; a retry later may succeed."""
