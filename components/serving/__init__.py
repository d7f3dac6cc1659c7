"""llmcycle components.serving."""
