"""llmcycle components: all the logic of the lifecycle, importable and testable without Prefect."""
