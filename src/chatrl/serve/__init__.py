"""Talking to a model: the terminal chat (``chat.py``) and the OpenAI-compatible server with its
web chat page (``app.py``, ``worker.py``, ``static/``). Both generate through an engine from
``chatrl.engine.load_engine``."""
