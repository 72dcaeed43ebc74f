"""Python SDK for a nextoken server: ``Client`` / ``AsyncClient`` over its OpenAI-compatible HTTP API.

    from nextoken_client import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.complete("Once upon a time", max_tokens=20).text)

Depends only on httpx; knows nothing of PyTorch, ONNX, or the rest of nextoken.
"""

from ._async_client import AsyncClient
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    NextokenError,
    OverloadedError,
    ServerError,
    StreamError,
    ValidationError,
)
from ._streaming import AsyncStream, Stream
from ._types import ChatMessage, Completion, Model, SamplingParams, StreamEvent, TokenLogprob, TopLogprob, Usage

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "Completion",
    "StreamEvent",
    "Usage",
    "TokenLogprob",
    "TopLogprob",
    "Model",
    "ChatMessage",
    "SamplingParams",
    "NextokenError",
    "APIStatusError",
    "ValidationError",
    "AuthenticationError",
    "OverloadedError",
    "ServerError",
    "StreamError",
    "APIConnectionError",
    "APITimeoutError",
    "__version__",
]
