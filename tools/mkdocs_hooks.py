"""MkDocs hooks: reference pages generated from the code at every build, never edited by hand.

- ``reference/cli.md``: the Typer app's click command tree (every command and group, its help,
  usage, arguments and options with defaults and environment variables);
- ``reference/rest.md``: the FastAPI app's OpenAPI schema, one section per route with its
  parameters, request body and responses, plus the raw schema for tools;
- ``benchmarks.md``: BENCHMARKS.md from the repository root, so there is one copy.

Loaded by ``hooks:`` in mkdocs.yml; the generated pages exist only in the build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    generated = {
        "reference/cli.md": cli_reference(),
        "reference/rest.md": rest_reference(),
        "benchmarks.md": (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"),
    }
    for path, content in generated.items():
        if files.get_file_from_path(path) is not None:
            raise RuntimeError(f"docs/{path} is generated at build time: delete that copy")
        files.append(File.generated(config, path, content=content))
    return files


# ------------------------------------------------------------------------------- CLI reference
def cli_reference() -> str:
    import typer.main

    from defectscope.cli import app

    root = typer.main.get_command(app)
    contexts = {("defectscope",): root.context_class(root, info_name="defectscope")}
    lines = [
        "# CLI reference",
        "",
        "Generated from the command line itself (`defectscope --help`) at every docs build.",
        "Every command prints one clear line and exits with status 2 on a user error; set",
        "`DEFECTSCOPE_DEBUG=1` for a traceback.",
        "",
    ]
    for path, command in walk_commands(root):
        context = command.context_class(command, info_name=path[-1], parent=contexts[path[:-1]])
        contexts[path] = context
        lines += command_section(path, command, context)
    return "\n".join(lines) + "\n"


def walk_commands(
    command: Any, path: tuple[str, ...] = ("defectscope",)
) -> list[tuple[tuple[str, ...], Any]]:
    """``(("defectscope", "client", "predict"), command)`` for every command and group, in the
    order ``--help`` lists them, groups before their subcommands.

    Duck-typed (a group is a command with ``commands``): Typer ships its own copy of click, so
    its commands are not instances of the ``click`` package's classes.
    """
    found: list[tuple[tuple[str, ...], Any]] = []
    if _is_group(command):
        for name, sub in command.commands.items():
            if not sub.hidden:
                found.append(((*path, name), sub))
                found += walk_commands(sub, (*path, name))
    return found


def _is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def command_section(path: tuple[str, ...], command: Any, context: Any) -> list[str]:
    heading = "#" * min(len(path), 4)
    lines = [f"{heading} `{' '.join(path)}`", ""]
    help_text = (command.help or "").strip()
    if help_text:
        lines += [help_text, ""]
    usage = command.get_usage(context).removeprefix("Usage: ").strip()
    lines += ["```text", usage, "```", ""]
    if _is_group(command):
        subs = ", ".join(f"`{name}`" for name in command.commands)
        lines += [f"Subcommands: {subs}.", ""]
        return lines
    rows = [_param_row(param) for param in command.params if not getattr(param, "hidden", False)]
    rows = [row for row in rows if row is not None]
    if rows:
        lines += ["| argument / option | description | default |", "|---|---|---|"]
        lines += rows
        lines.append("")
    return lines


def _param_row(param: Any) -> str | None:
    if param.name == "help":
        return None
    help_text = _escape(str(getattr(param, "help", None) or ""))
    if param.param_type_name == "argument":
        name = param.name.upper() if param.name else "?"
        if param.nargs == -1:
            name += "..."
        required = "required" if param.required else "optional"
        return f"| `{name}` ({required}) | {help_text} | |"
    flags = " / ".join(f"`{flag}`" for flag in [*param.opts, *param.secondary_opts])
    envvar = getattr(param, "envvar", None)
    if envvar:
        help_text += f" Environment: `{envvar}`."
    if param.required:
        default = "required"
    elif param.default is None or callable(param.default):
        default = ""
    else:
        default = f"`{_default_text(param.default)}`"
    return f"| {flags} | {help_text.strip()} | {default} |"


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def _escape(text: str) -> str:
    # Table cells: a pipe would end the cell, a newline the row.
    return text.replace("|", "\\|").replace("\n\n", "<br><br>").replace("\n", " ")


# ------------------------------------------------------------------------------ REST reference
def rest_reference() -> str:
    schema = openapi_schema()
    lines = [
        "# REST API reference",
        "",
        f"Generated from the OpenAPI schema of `defectscope serve` (version "
        f"{schema['info'].get('version', '?')}) at every docs build. A running server serves",
        "the same schema at `/openapi.json` and an interactive explorer at `/docs`.",
        "",
        "| method | path | summary |",
        "|---|---|---|",
    ]
    routes = [
        (path, method, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    ]
    for path, method, operation in routes:
        anchor = _anchor(method, path)
        summary = _escape(operation.get("summary", ""))
        lines.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {summary} |")
    lines.append("")
    for path, method, operation in routes:
        lines += route_section(schema, path, method, operation)
    lines += [
        "## Schema",
        "",
        '??? note "openapi.json"',
        "",
        "    ```json",
        *("    " + line for line in json.dumps(schema, indent=2).splitlines()),
        "    ```",
        "",
    ]
    return "\n".join(lines) + "\n"


def openapi_schema() -> dict[str, Any]:
    """The schema of the real app; no model is loaded (that happens at server start-up)."""
    from defectscope.serving.app import create_app
    from defectscope.serving.settings import ServingSettings

    return create_app(ServingSettings(model_path="model")).openapi()


def route_section(
    schema: dict[str, Any], path: str, method: str, operation: dict[str, Any]
) -> list[str]:
    lines = [f"## {method.upper()} `{path}` {{#{_anchor(method, path)}}}", ""]
    if operation.get("description"):
        lines += [operation["description"].strip(), ""]
    if operation.get("security"):
        lines += ["Needs the API key when the server has one (`X-API-Key` or bearer token).", ""]
    parameters = operation.get("parameters") or []
    if parameters:
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for parameter in parameters:
            lines.append(
                f"| `{parameter['name']}` | {parameter['in']} | "
                f"{_type(schema, parameter.get('schema', {}))} | "
                f"{'yes' if parameter.get('required') else 'no'} | "
                f"{_escape(parameter.get('description', ''))} |"
            )
        lines.append("")
    body = operation.get("requestBody")
    if body:
        kinds = ", ".join(
            f"`{media}` ({_type(schema, content.get('schema', {}))})"
            for media, content in body.get("content", {}).items()
        )
        lines += [f"Request body: {kinds or 'see the schema'}.", ""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in operation.get("responses", {}).items():
        content = response.get("content", {})
        kinds = ", ".join(
            f"`{media}` {_type(schema, item.get('schema', {}))}".strip()
            for media, item in content.items()
        )
        lines.append(f"| {status} | {_escape(response.get('description', ''))} | {kinds} |")
    lines.append("")
    return lines


def _type(schema: dict[str, Any], item: dict[str, Any]) -> str:
    if "$ref" in item:
        return item["$ref"].rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in item:
            return " or ".join(_type(schema, option) for option in item[key])
    if item.get("type") == "array":
        return f"array of {_type(schema, item.get('items', {}))}"
    return str(item.get("type", "object" if item.get("properties") else "any"))


def _anchor(method: str, path: str) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in path.lower()).strip("-")
    return f"{method.lower()}-{slug}"
