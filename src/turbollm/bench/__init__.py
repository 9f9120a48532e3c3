"""turbollm.bench."""
