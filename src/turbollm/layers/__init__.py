"""turbollm.layers."""
