"""Generation. For now a single-sequence generator over a paged KV cache (the batching engine comes next)."""
