"""OpenAI-compatible serving: engine (continuous batching), HTTP API, `python -m mixjax.serve`."""
