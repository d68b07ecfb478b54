"""`gptrain serve`: a checkpoint behind OpenAI's HTTP API (protocol.py, app.py), its requests decoded together by
one engine (engine.py), and a chat page (page.html)."""
