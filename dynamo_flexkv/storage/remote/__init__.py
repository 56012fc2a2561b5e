"""Cluster-wide tiers: key-value stores shared by every instance (Redis, Mooncake Store)."""
