"""The gateway's HTTP front: OpenAI-compatible images API, JSON template API, web mask editor (docs/http.md)."""
