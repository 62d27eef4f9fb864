"""Training: the train state and jitted steps, the loop, orbax checkpoints, metric sinks."""
