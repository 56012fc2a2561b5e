"""The scheduler-side tier stack: which tiers exist, what they hold, and the cascade between them.

`facts` — what an instance's stored blocks depend on; `stack` — the `TierStack` composition root;
`lookups` — shared-tier existence questions; `cascade` — staging and spilling between the CPU pool
and the lower tiers.
"""
