"""turbollm.attention."""
