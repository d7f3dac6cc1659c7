"""llmcycle components.evaluation."""
