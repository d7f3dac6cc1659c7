"""llmcycle components.monitoring."""
