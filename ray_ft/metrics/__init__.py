"""Scores shared by training validation and evaluation: QA answer metrics, retrieval metrics,
and the retrieval evaluation of an embedder."""
