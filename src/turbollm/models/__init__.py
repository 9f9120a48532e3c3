"""turbollm.models."""
