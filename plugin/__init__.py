"""vault-secrets: a Docker volume plugin delivering Vault / OpenBao secrets as files on a per-container tmpfs.

Packages by role, dependencies pointing inward (checked by import-linter in `make test`):
`edge` (dockerd's protocol, gunicorn, the control socket, Docker's API) -> `ops` (operators' tools) ->
`vault` and `host` (the adapters: Vault; tmpfs, SQLite, the seal) -> `core` (the volume verbs, renewal,
and the ports the adapters implement). `service` is the composition root that builds them from
`settings`; `cli` is the command line. docs/architecture.md traces one Mount through them.
"""
