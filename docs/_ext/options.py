"""The configuration reference, generated from :class:`certbound_wsgi.Settings`.

``settings.py`` is the one place where an option's type, default, environment
variable, description and rules (allowed values, range) live. The
``certbound-options`` directive renders them as a table when the docs are
built, so the docs cannot drift from the code. It works in reStructuredText and in MyST Markdown alike::

    ```{certbound-options}
    ```
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from docutils import nodes
from docutils.parsers.rst import Parser
from docutils.utils import new_document
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from certbound_wsgi import settings as settings_module
from certbound_wsgi.settings import Settings, env_name, rules_of

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _literal(text: str) -> str:
    return f"``{text}``"


def _type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"list of {_TYPE_NAMES[typing.get_args(hint)[0]]}s"
    if origin is Literal:
        return "string"
    return _TYPE_NAMES[hint]


def _default(field: dataclasses.Field[Any]) -> str:
    """The default as it would be written in the environment."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:
        value = field.default_factory()  # type: ignore[misc]
    if isinstance(value, bool):
        return _literal("true" if value else "false")
    if isinstance(value, tuple):
        return _literal(",".join(value)) if value else "*(empty)*"
    if value == "":
        return "*(empty)*"
    return _literal(str(value))


def _description(field: dataclasses.Field[Any]) -> str:
    """The option's description, then the rules declared with it: its values, its range, whether it may be empty."""
    rules = rules_of(field)
    text = rules.doc
    if rules.choices:
        text += " Values: " + ", ".join(_literal(choice) for choice in rules.choices) + "."
    if rules.range():
        text += f" Range: {rules.range()}."
    if rules.required:
        text += " Must not be empty."
    return text


def option_rows() -> list[tuple[str, str, str, str, str]]:
    """One ``(option, type, default, environment variable, description)`` row per option, in RST."""
    hints = typing.get_type_hints(Settings)
    return [
        (
            _literal(field.name),
            _type(hints[field.name]),
            _default(field),
            _literal(env_name(field.name)),
            _description(field),
        )
        for field in dataclasses.fields(Settings)
    ]


def options_table_rst() -> str:
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 18 12 12 22 36",
        "",
        "   * - Option",
        "     - Type",
        "     - Default",
        "     - Environment variable",
        "     - Description",
    ]
    for first, *rest in option_rows():
        lines.append(f"   * - {first}")
        lines.extend(f"     - {cell}" for cell in rest)
    return "\n".join(lines) + "\n"


class OptionsTable(SphinxDirective):
    """``certbound-options``: a table of every option of :class:`~certbound_wsgi.Settings`."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        # Rebuild the page whenever the options change.
        self.env.note_dependency(settings_module.__file__)
        # Parsed as reStructuredText whatever the host document's parser (MyST
        # would read a nested list-table as Markdown); only docutils' own
        # list-table and inline literals are used.
        document = new_document(settings_module.__file__, self.state.document.settings)
        Parser().parse(options_table_rst(), document)
        return list(document.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("certbound-options", OptionsTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
