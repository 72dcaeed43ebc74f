"""``nextoken-loadtest``: measure a running server the way ``vllm bench serve`` does.

``workload`` makes the requests, ``runner`` sends them (closed loop or Poisson open loop) and
times every token, ``stats`` turns timings into metrics, ``report`` prints/saves them and
``plots`` draws them. Only ever talks to the URL it is given.
"""

from .stats import ErrorDetail, LevelSummary, RequestRecord, percentile, summarize

__all__ = ["ErrorDetail", "LevelSummary", "RequestRecord", "percentile", "summarize"]
