"""Development and test environment: a real OpenBao dev server seeded with demo data.

Used by `make run` (the embedded default) and by the integration and end-to-end tests. Not shipped.
"""
