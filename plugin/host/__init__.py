"""The host side: the per-mount tmpfs (`mounts`, the only caller of mount(2)), the state database
(`store`, the only user of SQLite), and the seal of tokens at rest (`seal`, the only holder of the key).

May import: the core.
"""
