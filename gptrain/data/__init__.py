"""The data path: text -> tokenizer -> prepared .bin datasets -> batches."""
