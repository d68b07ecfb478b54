"""One module per `gptrain` command: its arguments and what it runs (cli.py builds the parser from them)."""
