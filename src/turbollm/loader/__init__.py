"""turbollm.loader."""
