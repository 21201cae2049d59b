"""Training: the shipped shapes base model (bootstrap) and the SUR-adapter."""
