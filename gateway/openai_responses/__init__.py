"""The OpenAI Responses API, served through the chat pipeline (docs/responses.md)."""
