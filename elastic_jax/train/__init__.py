"""Training: train state, losses, budget sampler, stages, step function, sharding rules, checkpointing."""
