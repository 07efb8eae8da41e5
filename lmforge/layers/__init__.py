"""Building blocks shared by every model family: attention, rotary embeddings, norms, MLPs, MoE."""
