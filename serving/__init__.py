"""serve.py's three rooms: the batching engine (engine.py: torch only), the OpenAI API over it (api.py), and
the prompt-optimising proxy in front of another LLM (proxy.py), kept alone so that its security reads alone."""
