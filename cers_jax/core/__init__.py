"""The floor every layer imports for its types: the train state, the jitted steps and their
config, the losses, the state-level embeddings and the training-method protocol."""
