"""Serving: an OpenAI-compatible API over a batching engine in front of `generate()`, metrics, and a
live page that shows the denoising. Optional extra `[serve]` (FastAPI, uvicorn, prometheus-client)."""
