"""cleanplate.training: synthetic data and the trainers that produce model bundles."""
