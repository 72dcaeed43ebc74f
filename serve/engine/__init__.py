"""The engine process: the model versions, the scheduler, the runner and the sampler.

It knows nothing about HTTP: requests arrive as ``wire`` messages and leave as token ids.
"""
