"""The core: what the plugin does, knowing neither HTTP nor hvac, SQLite nor mount(2).

The volume verbs and their orchestration (`driver`), options and rendering (`spec`, `render`,
`template`), keeping mounts alive (`upkeep`, `scheduler`, `revocation`), the retry policy (`retry`),
the error family (`errors`) and the counters (`metrics`). What it needs from the outside is typed in
`ports` (Protocols the adapters and the test fakes implement); the values it exchanges are in `records`.

May import: only the standard library, jinja2 (templates) and prometheus_client (counters). Imported by
everything else.
"""
