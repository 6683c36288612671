"""Static checks of the Dockerfiles and compose.yaml, for a machine without a Docker engine.

Each check returns a list of problems (empty: fine), so the tests can show that a deliberately
broken file is caught. What they check is what broke the predecessor's images: COPY sources that
did not exist or were excluded by .dockerignore, stages that did not exist, entry points that
named missing commands, and settings variables that nothing read.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from defectscope.cli import app as cli_app
from defectscope.serving.settings import ServingSettings

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- .dockerignore
class DockerIgnore:
    """Docker's .dockerignore rules: Go-style globs with ``**``, ``!`` re-includes, last match
    wins, and a pattern matching a folder matches everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line[1:].strip() if include else line
            pattern = pattern.strip("/")
            self.rules.append((include, re.compile(_glob_to_regex(pattern))))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for include, pattern in self.rules:
            if any(pattern.fullmatch(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def _glob_to_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


# ------------------------------------------------------------------------------ Dockerfile
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options, then the remaining words (JSON or shell form)."""
        rest = self.args.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if rest.startswith("["):
            return flags, json.loads(rest)
        return flags, shlex.split(rest)


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                name, _, value = word.partition("=")
                values[name] = value
        return values


def parse_dockerfile(text: str) -> tuple[list[str], list[Stage]]:
    """(ARG names declared before the first FROM, stages) of a Dockerfile."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    global_args: list[str] = []
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0]))
        elif not stages:
            if keyword == "ARG":
                global_args.append(args.split("=", 1)[0].strip())
        else:
            stages[-1].instructions.append(Instruction(keyword, args, number))
    return global_args, stages


def check_dockerfile(path: Path, context: Path = ROOT) -> list[str]:
    """Problems with ``path`` built from ``context``; empty when it is sound."""
    problems: list[str] = []
    text = path.read_text()
    global_args, stages = parse_dockerfile(text)
    if not stages:
        return [f"{path.name}: no FROM"]
    ignore = DockerIgnore((context / ".dockerignore").read_text())
    pyproject = tomllib.loads((context / "pyproject.toml").read_text())
    names: list[str] = []
    for stage in stages:
        for used in re.findall(r"\$\{?(\w+)", stage.base):
            if used not in global_args:
                problems.append(f"FROM {stage.base}: ARG {used} is not declared before FROM")
        problems += _check_copies(stage, names, stages, context, ignore)
        problems += _check_installs(stage, pyproject)
        if stage.name:
            names.append(stage.name)
    final = stages[-1]
    problems += _check_final_stage(final, pyproject)
    return [f"{path.name}: {problem}" for problem in problems]


def _check_copies(
    stage: Stage, earlier: list[str], stages: list[Stage], context: Path, ignore: DockerIgnore
) -> list[str]:
    problems = []
    for instruction in stage.all("COPY") + stage.all("ADD"):
        flags, words = instruction.flags_and_words()
        sources = words[:-1]
        origin = flags.get("from")
        if origin is not None:
            if origin not in earlier:
                problems.append(f"line {instruction.line}: --from={origin} is not an earlier stage")
                continue
            built = "\n".join(
                i.args for i in next(s for s in stages if s.name == origin).instructions
            )
            for source in sources:
                if not re.search(rf"(?<![\w/.-]){re.escape(source)}(?![\w.-])", built):
                    problems.append(
                        f"line {instruction.line}: {source} is never created in stage {origin}"
                    )
            continue
        for source in sources:
            problems += _check_context_source(source, context, ignore, instruction.line)
    return problems


def _check_context_source(source: str, context: Path, ignore: DockerIgnore, line: int) -> list[str]:
    matches = sorted(context.glob(source.strip("/"))) if source.strip("/") else [context]
    if not matches:
        return [f"line {line}: COPY source {source} does not exist in the build context"]
    sent = []
    for match in matches:
        files = [match] if match.is_file() else [p for p in match.rglob("*") if p.is_file()]
        sent += [f for f in files if not ignore.excluded(f.relative_to(context).as_posix())]
    if not sent:
        return [f"line {line}: COPY source {source} is excluded by .dockerignore"]
    return []


def _check_installs(stage: Stage, pyproject: dict[str, Any]) -> list[str]:
    """Extras named in ``pip install ...[extra]`` exist; torch bounds are pyproject's."""
    problems = []
    extras = set(pyproject["project"].get("optional-dependencies", {}))
    requirements = {
        re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0]: dep
        for dep in pyproject["project"]["dependencies"]
    }
    for instruction in stage.all("RUN"):
        for group in re.findall(r"\.whl\)?\[([\w,]+)\]", instruction.args):
            for extra in group.split(","):
                if extra not in extras:
                    problems.append(f"line {instruction.line}: extra [{extra}] is not in pyproject")
        for package in ("torch", "torchvision"):
            for spec in re.findall(rf'"({package}[<>=!~][^"]*)"', instruction.args):
                if spec.replace(" ", "") != requirements[package].replace(" ", ""):
                    problems.append(
                        f"line {instruction.line}: {spec} differs from pyproject's "
                        f"{requirements[package]}"
                    )
    return problems


def _check_final_stage(final: Stage, pyproject: dict[str, Any]) -> list[str]:
    problems = []
    users = final.all("USER")
    if not users or users[-1].args.split(":")[0].strip() in ("root", "0"):
        problems.append("the final stage does not switch to a non-root USER")
    env = final.env()
    cmds = final.all("CMD") + final.all("ENTRYPOINT")
    if not cmds:
        return [*problems, "the final stage has no CMD"]
    _, command = cmds[-1].flags_and_words()
    script = command[2] if command[:2] == ["sh", "-c"] else shlex.join(command)
    if "${PORT" not in script and "$PORT" not in script:
        problems.append("CMD does not use $PORT")
    problems += check_entry_point(script, pyproject)
    healthchecks = final.all("HEALTHCHECK")
    if not healthchecks or healthchecks[-1].args.strip().upper() == "NONE":
        problems.append("the final stage has no HEALTHCHECK")
    else:
        _, probe = Instruction(
            "CMD", healthchecks[-1].args.split(" CMD ", 1)[-1], 0
        ).flags_and_words()
        problems += check_python_probe(probe)
        if "PORT" not in healthchecks[-1].args:
            problems.append("HEALTHCHECK does not use $PORT")
    port = env.get("PORT")
    exposed = [word for i in final.all("EXPOSE") for word in i.args.split()]
    default = re.search(r"\$\{PORT:-(\d+)\}", script)
    if port is None or exposed != [port] or default is None or default.group(1) != port:
        problems.append(
            f"ports disagree: ENV PORT={port}, EXPOSE {exposed}, "
            f"CMD default {default.group(1) if default else None}"
        )
    for name in env:
        used_by_cmd = re.search(rf"\b{name}\b", script) is not None
        if name.startswith("DEFECTSCOPE_") and name not in read_settings() and not used_by_cmd:
            problems.append(f"ENV {name} is read neither by defectscope nor by the CMD")
    return problems


def check_entry_point(script: str, pyproject: dict[str, Any]) -> list[str]:
    """The command a shell script runs is a console script of the package, with a real
    subcommand and real options (or ``python -m`` of a module that exists)."""
    words = shlex.split(script)
    if words and words[0] == "exec":
        words = words[1:]
    if not words:
        return ["CMD runs nothing"]
    scripts = pyproject["project"].get("scripts", {})
    if words[0] in ("python", "python3") and words[1:2] == ["-m"]:
        import importlib.util

        if importlib.util.find_spec(words[2]) is None:
            return [f"CMD runs python -m {words[2]}, which does not exist"]
        return []
    if words[0] not in scripts:
        return [f"CMD runs {words[0]!r}, which is not a console script in pyproject"]
    if scripts[words[0]] != "defectscope.cli:main":
        return []
    commands = getattr(typer.main.get_command(cli_app), "commands", {})
    command = commands.get(words[1]) if len(words) > 1 else None
    if command is None:
        return [f"CMD runs 'defectscope {words[1:2]}', which is not a defectscope command"]
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    return [
        f"CMD passes {word} to 'defectscope {words[1]}', which has no such option"
        for word in words[2:]
        if word.startswith("--") and word.split("=")[0] not in options
    ]


def check_python_probe(command: list[str]) -> list[str]:
    """A health probe must be ``python -c CODE`` with code that compiles (no curl in slim)."""
    if len(command) != 3 or command[0] not in ("python", "python3") or command[1] != "-c":
        return [f"health probe is not 'python -c CODE': {command}"]
    try:
        ast.parse(command[2])
    except SyntaxError as exc:
        return [f"health probe code does not compile: {exc}"]
    return []


def read_settings() -> set[str]:
    """Every DEFECTSCOPE_* variable the package reads: settings fields and literal names."""
    names = {f"DEFECTSCOPE_{name.upper()}" for name in ServingSettings.model_fields}
    for source in (ROOT / "src" / "defectscope").rglob("*.py"):
        names.update(re.findall(r"DEFECTSCOPE_[A-Z0-9_]+", source.read_text()))
    return names


# ------------------------------------------------------------------------------ compose.yaml
def check_compose(compose: dict[str, Any], root: Path = ROOT) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = compose.get("services", {})
    declared_volumes = set(compose.get("volumes") or {})
    known = read_settings()
    for name, service in services.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        dockerfile_stage = None
        build = service.get("build")
        if build is not None:
            context = root / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: build file {dockerfile} does not exist")
            else:
                dockerfile_stage = parse_dockerfile(dockerfile.read_text())[1][-1]
            for variable in environment:
                if variable.startswith("DEFECTSCOPE_") and variable not in known:
                    problems.append(f"{name}: {variable} is not read by defectscope")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                if not (root / source).exists():
                    problems.append(f"{name}: mounted {source} does not exist")
            elif not source.startswith("$") and source not in declared_volumes:
                problems.append(f"{name}: volume {source} is not declared")
        for port in service.get("ports", []):
            container = str(port).rsplit(":", 1)[-1]
            expected = str(environment.get("PORT") or "")
            if dockerfile_stage is not None:
                exposed = [w for i in dockerfile_stage.all("EXPOSE") for w in i.args.split()]
                if container != expected or container not in exposed:
                    problems.append(
                        f"{name}: publishes {container}, but PORT={expected} and the image "
                        f"exposes {exposed}"
                    )
        for other, condition in (service.get("depends_on") or {}).items():
            if other not in services:
                problems.append(f"{name}: depends on unknown service {other}")
                continue
            if condition.get("condition") == "service_healthy" and not _has_healthcheck(
                services[other], root
            ):
                problems.append(f"{name}: waits for {other} to be healthy, which has no check")
        check = service.get("healthcheck", {}).get("test")
        if check and check[0] == "CMD" and check[1] in ("python", "python3"):
            problems += [f"{name}: {p}" for p in check_python_probe(check[1:])]
    return problems


def _has_healthcheck(service: dict[str, Any], root: Path) -> bool:
    if service.get("healthcheck"):
        return True
    build = service.get("build")
    if build is None:
        return False
    dockerfile = root / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    return bool(parse_dockerfile(dockerfile.read_text())[1][-1].all("HEALTHCHECK"))
