"""The offline tools: writing shards, indexing existing tars, uploading, verifying, statistics, demo data."""
