"""The OpenAI-compatible server: `create_app(engine)` (openai_api), request/response models (protocol), metrics."""
