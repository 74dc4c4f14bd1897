"""The layer-by-layer engine: capture block-0 inputs, then per block: statistics → decompose → replace → propagate."""
