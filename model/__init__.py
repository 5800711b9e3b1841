"""The transformer: config parsing, weight loading, presets, tokenizer, forward pass, sampling."""
