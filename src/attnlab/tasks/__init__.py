"""Built-in tasks generated on the machine (no download): seq2seq tasks for the encoder-decoder, and
(for Infini-attention) passkey retrieval."""
