"""`billion serve`: an OpenAI-compatible HTTP server over loaded engines."""
