"""`template.<file>=...`: several secrets rendered into one file by a sandboxed Jinja2 template.

Pure but for where it runs: rendering happens in a bounded child process (`plugin.core.bounded`), since a
template can loop for ever or grow without end and Python cannot stop a thread.

A template reaches exactly one global, `secret("<source>")`, which returns that source's data, and
Jinja2's built-in filters. Sources must be string literals so that Create can validate them and Mount
knows every request up front. Errors name the file and the problem, never a secret value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, cast

from jinja2 import (
    StrictUndefined,
    TemplateError,
    TemplateSyntaxError,
    UndefinedError,
    nodes,
)
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from plugin.core import retry
from plugin.core.bounded import MEMORY, BoundExceededError, run_bounded
from plugin.core.errors import InvalidOptionError, SecretFormatError

MAX_TEMPLATE = 16 << 10
RENDER_SECONDS = 2.0
MAX_OUTPUT = 16 << 20  # the largest tmpfs (size=16m)

# Immutable: a template cannot change the secret data its sibling files are rendered from (dict.update...).
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_ENV.globals.clear()  # no range, dict, lipsum, cycler, joiner, namespace: only secret() is given


def template_sources(name: str, text: str) -> tuple[str, ...]:
    """The literal arguments of every `secret(...)` call, in order. Raises `InvalidOptionError`."""
    if len(text) > MAX_TEMPLATE:
        raise InvalidOptionError(f"option template.{name}: templates are limited to {MAX_TEMPLATE // 1024} KiB")
    try:
        tree = _ENV.parse(text)
    except TemplateSyntaxError as e:
        raise InvalidOptionError(f"option template.{name}: syntax error on line {e.lineno}: {e.message}") from e
    sources = []
    for call in tree.find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name == "secret"):
            continue
        args = call.args
        if len(args) != 1 or call.kwargs or not isinstance(args[0], nodes.Const) or not isinstance(args[0].value, str):
            raise InvalidOptionError(
                f'option template.{name}: secret() takes one quoted Vault path, e.g. secret("database/creds/app")'
            )
        sources.append(args[0].value)
    allowed = {"secret", "loop"} | _bound_names(tree)
    for used in tree.find_all(nodes.Name):
        if used.ctx == "load" and used.name not in allowed:
            raise InvalidOptionError(
                f'option template.{name}: unknown name {used.name!r}; a template can use only secret("<path>")'
            )
    return tuple(dict.fromkeys(sources))


def _bound_names(tree: nodes.Template) -> set[str]:
    """Names the template binds itself, with {% for %} and {% set %}."""
    names: set[str] = set()
    # find_all is typed to yield the nodes' common base (Stmt), which has no `target`.
    bound = cast("Iterator[nodes.For | nodes.Assign]", tree.find_all((nodes.For, nodes.Assign)))
    for node in bound:
        targets = [node.target, *node.target.find_all(nodes.Name)]
        names.update(t.name for t in targets if isinstance(t, nodes.Name))
    return names


def render_template(name: str, text: str, secrets: Mapping[str, Mapping[str, Any]]) -> str:
    """Render template file `name`; `secrets` maps each literal `secret()` argument to its data.

    The rendering runs bounded (`plugin.core.bounded`): RENDER_SECONDS (less if the caller's budget ends
    sooner), a memory cap, and MAX_OUTPUT bytes. Raises `SecretFormatError` naming the file and what is
    wrong (a missing field, a type error, a bound exceeded).
    """

    def secret(source: str) -> Mapping[str, Any]:
        return secrets[source]

    def render() -> str:
        try:
            # Compiled in the child too: Jinja2 folds constant expressions at compile time ('x' * 10**9).
            return _ENV.from_string(text).render(secret=secret)
        except UndefinedError as e:
            # Jinja2 names the missing attribute and the kind of object, not its content.
            raise SecretFormatError(f"template {name}: {e.message}") from None
        except SecurityError as e:  # the same: what was forbidden, on which kind of object
            raise SecretFormatError(f"template {name}: SecurityError: {e.message}") from None
        except TemplateError as e:
            raise SecretFormatError(f"template {name}: {type(e).__name__} while rendering") from None
        except MemoryError:
            raise  # the bound's to report (plugin.core.bounded)
        except Exception as e:  # noqa: BLE001  (TypeError, RecursionError...: in the child, sent to the caller)
            # Their messages can quote operands, which may be secret values: only the kind is reported.
            raise SecretFormatError(
                f"template {name}: {type(e).__name__} while rendering (check the expressions)"
            ) from None

    left = retry.remaining()
    seconds = RENDER_SECONDS if left is None else max(min(RENDER_SECONDS, left), 0.1)
    try:
        return run_bounded(render, seconds=seconds, max_output=MAX_OUTPUT)
    except BoundExceededError as e:
        raise SecretFormatError(
            f"template {name}: {e}; a template gets {RENDER_SECONDS:g}s, {MEMORY >> 20} MiB and "
            f"{MAX_OUTPUT >> 20} MiB of output: simplify it"
        ) from None


class _Placeholder(dict[str, Any]):
    """What `secret()` gives a template checked at Create: any field reads as a short string."""

    def __missing__(self, key: str) -> str:
        return "placeholder"


def check_bounds(name: str, text: str) -> None:
    """At Create: render the template with placeholder data, bounded as at Mount. A template whose cost does
    not depend on the secrets (a loop over a huge constant, a string grown without end) is refused now,
    not at every Mount. Other rendering errors are left to the Mount, where the real data is known.

    Raises `InvalidOptionError`."""

    def render() -> str:
        try:
            return _ENV.from_string(text).render(secret=lambda source: _Placeholder())
        except Exception:  # noqa: BLE001  (types differ from the real data's: only the bounds count here)
            return ""

    try:
        run_bounded(render, seconds=RENDER_SECONDS, max_output=MAX_OUTPUT)
    except BoundExceededError as e:
        raise InvalidOptionError(
            f"option template.{name}: {e} even with placeholder data; a template gets {RENDER_SECONDS:g}s, "
            f"{MEMORY >> 20} MiB and {MAX_OUTPUT >> 20} MiB of output: simplify it"
        ) from None
