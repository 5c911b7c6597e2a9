"""Serving: engines behind small protocols and the Ray Serve RAG graph."""
