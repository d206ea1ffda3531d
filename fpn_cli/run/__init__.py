"""A run: options, device and precision, the pipeline's steps, resume, sharding, signals."""
