"""SUR-adapter serving: a FastAPI + uvicorn service for `models:/sur-adapter@production`.

`sur serve` (or `python -m serving`) resolves the alias, verifies every file's sha256, loads
the ONNX text path and the base UNet/VAE, and serves embeddings, images, a web page, health,
readiness and Prometheus metrics; it hot-swaps when the alias moves.
"""
