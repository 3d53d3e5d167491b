"""The model being built, opened once per run: its directory, its config.json read and normalised
once, its shape (head padding, experts), its tokenizer, and the ``--model NAME`` registry. Below
convert/, quantize/ and verify/: imports neither of them nor torch."""
