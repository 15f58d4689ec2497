"""Training: the loop (accelerate, DDP/FSDP2), the Trainer callback, memory options, losses, FSDP sharding."""
