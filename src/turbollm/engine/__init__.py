"""turbollm.engine."""
