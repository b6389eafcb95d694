"""Runtime: engine, loading, sampling and tokenization (the tiered memory system grows here)."""
