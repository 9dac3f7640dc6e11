"""Training-time reading: shard discovery, the per-year sample order, the rehearsal sampler, the loader."""
