"""The SSD tier: `tier` (the backend), `store` (slots, records, recovery), `engines` (I/O engines
and the file format), `seats` (which instance owns which files).
"""
