"""The OpenAI-compatible HTTP surface; `jpaged.serve.openai.app` builds and runs it."""
