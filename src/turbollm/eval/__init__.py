"""turbollm.eval."""
