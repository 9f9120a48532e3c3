"""turbollm.worker."""
