"""The torch-free core: requests, the scheduler, KV block accounting. Imports no torch."""
