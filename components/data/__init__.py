"""llmcycle components.data."""
