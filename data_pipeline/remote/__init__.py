"""Shards in object storage: stores, retries, the node-local cache, read-ahead, pre-launch checks."""
