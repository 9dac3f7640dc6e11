"""Data: shard discovery, the rehearsal sampler, decoding and batching."""
