"""Ouro -> MELT conversion: synthetic data, tokenizer and the data pipeline the converter trains on."""
