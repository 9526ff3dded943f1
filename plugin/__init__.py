"""vault-secrets: a Docker volume plugin delivering Vault / OpenBao secrets as files on a per-container tmpfs."""
