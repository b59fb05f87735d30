"""Models: the SD and LCM backends, where a model comes from (registry, cache), the protected layers, the embedded
tiny model with its tokenizer, the demo subject, the Ray Data sampler that every stage samples images with, and the
toy world (`toyworld/`: the procedural world, its probe, the training recipe and the shipped weights)."""
