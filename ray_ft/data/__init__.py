"""Data preparation: readers, prompt templates, splits, tokenization and Ray Data shard writing."""
