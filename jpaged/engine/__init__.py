"""The engine: `LLMEngine` (one step at a time), `LLM` (offline) and `AsyncLLM` (serving)."""
