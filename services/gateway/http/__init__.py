"""The gateway's HTTP front: OpenAI-compatible images API, a JSON template API and the web mask editor (docs/http.md)."""
