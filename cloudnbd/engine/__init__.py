"""The write-back engine: local journal and cache, uploader and fetcher processes."""
