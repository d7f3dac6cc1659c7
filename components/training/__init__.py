"""llmcycle components.training."""
