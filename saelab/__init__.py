"""saelab: sparse autoencoders on transformer LM activations."""
