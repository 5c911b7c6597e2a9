"""Training on Ray Train."""
