"""specserve: fast, lossless LLM decoding."""
