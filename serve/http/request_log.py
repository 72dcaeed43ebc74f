"""The request log: one JSON line per generation request, where accepted metadata is recorded.

OpenAI's ``user``, ``metadata``, ``safety_identifier`` and ``prompt_cache_key`` change nothing the model
does; the server accepts them because it records them here (with the request id, route, model,
outcome, number of choices and token counts), so an operator can attribute traffic. The log is the
``nextoken.serve.requests`` logger, written to stderr when the server runs at ``--log-level info`` or
``debug`` (``install_request_log``, called once in the HTTP process).
"""

from __future__ import annotations

import json
import logging
from typing import Any

REQUEST_LOG = logging.getLogger("nextoken.serve.requests")


def install_request_log(log_level: str) -> None:
    """Write the request log to stderr at --log-level info or debug (idempotent)."""
    if logging.getLevelName(log_level.upper()) > logging.INFO or REQUEST_LOG.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    REQUEST_LOG.propagate = False


class RequestLog:
    """One request's line, written once, when its outcome is known."""

    def __init__(self, rid: str, endpoint: str, model: str, recorded: dict[str, Any], choices: int) -> None:
        self.rid, self.endpoint, self.model, self.recorded, self.choices = rid, endpoint, model, recorded, choices
        self.done = False

    def write(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self.done or not REQUEST_LOG.isEnabledFor(logging.INFO):
            return
        self.done = True
        REQUEST_LOG.info(json.dumps({"id": self.rid, "endpoint": self.endpoint, "model": self.model,
                                     "outcome": outcome, "choices": self.choices, "prompt_tokens": prompt_tokens,
                                     "completion_tokens": completion_tokens, **self.recorded}, ensure_ascii=False))
