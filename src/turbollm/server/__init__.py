"""turbollm.server."""
