"""ray_ft: fine-tune, serve and evaluate retrieval-augmented LLM systems on a Ray cluster."""

__version__ = "0.1.0"
