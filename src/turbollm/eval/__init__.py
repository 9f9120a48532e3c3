"""Quality evaluation: perplexity and agreement between model configurations."""
