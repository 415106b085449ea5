"""What a shard folder is: sample table, memory-mapped columns, DALI index files, labels, location, checksums."""
