"""turbollm.plan."""
