"""Hugging Face interop: reading GPT-2 and Llama folders, writing them back, and their tokenizer files."""
