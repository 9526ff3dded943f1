"""The Vault side: the adapter for Vault and OpenBao (`client`), and what is built on it alone:
response-wrapping tokens (`wrapping`), the plugin's own identity (`identity`), per-volume credentials
(`credentials`).

May import: the core. Alone imports hvac and requests; errors from them are translated here, once.
"""
