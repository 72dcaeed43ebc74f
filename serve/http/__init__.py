"""The HTTP side: OpenAI routes, the request contract, SSE, middleware, OpenAPI and the playground.

It knows nothing about the engine's internals: requests leave as ``wire`` messages and come back as
token ids, which it turns into text.
"""
