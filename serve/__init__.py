"""Serving: one denoising pipeline over pluggable runners behind a FastAPI server."""
