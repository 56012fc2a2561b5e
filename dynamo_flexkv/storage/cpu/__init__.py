"""The CPU tier: a shared-memory block pool every TP rank maps."""
