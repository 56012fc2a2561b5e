"""Where bytes live: block layouts, the shared-memory CPU pool, SSD files, remote store clients."""
