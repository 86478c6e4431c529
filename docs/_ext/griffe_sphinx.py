"""Griffe extension for this site: read the Sphinx conventions of the package's docstrings.

The docstrings of :mod:`lrp_explicit` are NumPy style with two Sphinx habits that mkdocstrings
does not understand by itself:

* cross-reference roles (``:func:`explain```, ``:class:`~lrp_explicit.Composite```,
  ``:data:`ABSORBERS```): each becomes a link, resolved in the scope of the object that carries
  the docstring (as Sphinx does) and emitted as an *optional* mkdocs-autorefs reference, so a
  target that the site does not render (``torch.matmul``) stays plain code instead of failing
  the strict build;
* ``#:`` comments above (or after) an attribute assignment: they become the attribute's
  docstring when it has none;
* reStructuredText simple tables (rows between ``====  ====`` borders): they become Markdown
  tables;
* module constants assigned by tuple unpacking (``TARGET, INPUTS = "<target>", "<inputs>"``),
  which griffe does not record as attributes by itself.

Nothing here changes the package; griffe loads this file through ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``).
"""
from __future__ import annotations

import ast
import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(func|meth|class|mod|data|attr|exc|obj|const):`(~?)([^`<>]+?)`")
CALLABLE_ROLES = {"func", "meth"}


def _objects(obj: griffe.Object):
    """``obj`` and every non-alias member below it."""
    yield obj
    for member in list(obj.members.values()):
        if not member.is_alias:
            yield from _objects(member)


def _resolve(obj: griffe.Object, role: str, target: str) -> str:
    """The identifier a role's target names, seen from ``obj`` (best effort)."""
    root = obj.package
    if target.split(".", 1)[0] == root.name:
        path = target
    else:
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except (griffe.NameResolutionError, ValueError):
            return target
        if rest:
            path = f"{path}.{rest}"
    if role in CALLABLE_ROLES:
        # ``lrp_explicit.explain`` is both a package and the function it re-exports; griffe
        # keeps the package (a submodule shadows a member), the role asks for the function.
        try:
            found = root.modules_collection.get_member(path)
        except (KeyError, ValueError, AttributeError):
            found = None
        if found is not None and found.is_module:
            name = path.rsplit(".", 1)[-1]
            if name in found.members:
                path = f"{path}.{name}"
    return path


def _link(obj: griffe.Object, match: re.Match) -> str:
    role, short, target = match.groups()
    target = target.strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if role in CALLABLE_ROLES and not shown.endswith(")"):
        shown += "()"
    identifier = html.escape(_resolve(obj, role, target), quote=True)
    return f'<autoref identifier="{identifier}" optional><code>{html.escape(shown)}</code></autoref>'


BORDER = re.compile(r"^\s*=+( +=+)+\s*$")


def _rst_tables(text: str) -> str:
    """reST simple tables (no header, or one header row) as Markdown tables.

    A row is split at runs of two or more spaces; a line whose first column is blank continues
    the cell of the row above.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        columns = len(lines[i].split())
        end = next((j for j in range(i + 1, len(lines)) if BORDER.match(lines[j])), None)
        if end is None:
            out.append(lines[i])
            i += 1
            continue
        header: list[str] | None = None
        body = lines[i + 1:end]
        close = end
        later = next((j for j in range(end + 1, len(lines)) if BORDER.match(lines[j])), None)
        if len(body) == 1 and later is not None:  # border, header, border, rows, border
            header, body, close = _cells(body[0], columns), lines[end + 1:later], later
        rows: list[list[str]] = []
        for line in body:
            if not line.strip():
                continue
            if rows and line[:1].isspace():
                cells = _cells(line.strip(), columns - 1)
                rows[-1][-len(cells):] = [f"{a} {b}".strip() for a, b in
                                          zip(rows[-1][-len(cells):], cells)]
            else:
                rows.append(_cells(line, columns))
        out.append("")
        out.append("| " + " | ".join(header or [""] * columns) + " |")
        out.append("|" + "---|" * columns)
        out.extend("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows)
        out.append("")
        i = close + 1
    return "\n".join(out)


def _cells(line: str, columns: int) -> list[str]:
    cells = re.split(r"\s{2,}", line.strip(), maxsplit=columns - 1)
    return cells + [""] * (columns - len(cells))


def _comment_docstring(attr: griffe.Attribute, lines: list[str]) -> str | None:
    """The ``#:`` comment lines right above ``attr`` (or after it on its line)."""
    if attr.lineno is None or not lines:
        return None
    index = attr.lineno - 1
    if index >= len(lines):
        return None
    same_line = lines[index].partition("#:")[2] if "#:" in lines[index] else ""
    if same_line.strip():
        return same_line.strip()
    above: list[str] = []
    index -= 1
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        above.append(lines[index].lstrip()[2:].strip())
        index -= 1
    return "\n".join(reversed(above)) or None


class SphinxCompat(griffe.Extension):
    """Turn Sphinx roles into optional cross-references and ``#:`` comments into docstrings."""

    def on_module_members(self, *, node: Any, mod: griffe.Module, agent: Any,
                          **kwargs: Any) -> None:
        if not isinstance(node, ast.Module):
            return
        for statement in node.body:
            if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                    and isinstance(statement.targets[0], ast.Tuple)
                    and isinstance(statement.value, ast.Tuple)
                    and len(statement.targets[0].elts) == len(statement.value.elts)):
                continue
            for target, value in zip(statement.targets[0].elts, statement.value.elts):
                if isinstance(target, ast.Name) and target.id not in mod.members:
                    mod.set_member(target.id, griffe.Attribute(
                        target.id, lineno=statement.lineno, endlineno=statement.end_lineno,
                        value=ast.unparse(value)))

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.is_attribute and obj.docstring is None:
                try:
                    lines = loader.lines_collection[obj.filepath]
                except (KeyError, TypeError, griffe.BuiltinModuleError):
                    lines = []
                text = _comment_docstring(obj, lines)
                if text:
                    obj.docstring = griffe.Docstring(text, lineno=obj.lineno,
                                                     endlineno=obj.lineno, parent=obj)
            if obj.docstring is not None:
                value = obj.docstring.value
                if "==" in value:
                    value = _rst_tables(value)
                obj.docstring.value = ROLE.sub(lambda m, o=obj: _link(o, m), value)
