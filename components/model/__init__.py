"""llmcycle components.model."""
