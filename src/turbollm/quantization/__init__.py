"""Weight and KV-cache quantization: interchange forms, linear methods and their kernels."""
