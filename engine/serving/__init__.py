"""Step-level continuous batching: a pure-Python step scheduler and the engine loop that drives it."""
