"""Data preparation for tools/make_shards.py: raw data -> yearly webdataset shards (torch-free)."""
