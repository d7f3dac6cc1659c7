"""llmcycle flows: thin Prefect flows and the Typer CLI over components/."""
