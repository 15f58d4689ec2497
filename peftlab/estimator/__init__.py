"""The memory estimator: parameters, optimizer state and saved activations before a run."""
