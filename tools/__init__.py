"""Command-line tools: `apirouter`, `apirouterctl`, and the mock LLM backend."""
