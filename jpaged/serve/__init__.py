"""OpenAI-compatible HTTP serving: `jpaged serve` (see `jpaged.serve.openai.app`)."""
