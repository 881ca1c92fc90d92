"""Inference on stored models: synchronous requests, queued inference jobs, uncertainty options."""
