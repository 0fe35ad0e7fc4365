"""The result store: results on disk (results.py), their long table (frames.py), provenance,
content hashing and the writer lock. It knows no probe."""
