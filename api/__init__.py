"""The OpenAI-compatible HTTP API served by the root (/v1/chat/completions, /v1/completions,
/v1/models, /health, /metrics)."""
