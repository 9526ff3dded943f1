"""The operators' tools: `status` and `doctor` (`operations`), log formatting (`logs`), and the migration
of compose files off environment-variable secrets (`migrate`, `secret_detect`).

May import: the core, vault and host. Imported by the edge and the composition root.
"""
