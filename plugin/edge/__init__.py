"""The edge: everything that speaks to the outside world on its terms.

dockerd's volume plugin protocol (`app`, Flask), the gunicorn server on the Unix sockets (`server`), the
operators' control socket (`control`), and clients of Docker's API (`docker_api`, over `unixhttp`).
Docker's wire names (`Name`, `Mountpoint`, `Err`...) appear only here.

May import: the core, and the packages below it (ops, vault, host). Alone imports flask, werkzeug and
gunicorn. Never imported by the core or the adapters.
"""
