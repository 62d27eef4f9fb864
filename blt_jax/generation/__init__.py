"""Generation: prompts and buckets, sampling, the cached engine, the samplers (ar, s, d, dv), cost records."""
