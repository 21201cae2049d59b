"""The frozen-output cache: VAE latent distributions and text-encoder states, computed once."""
