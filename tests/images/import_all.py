"""Run inside the client image: import every module that the image's commands can reach.

From each command (argv), follow our own imports (core/, client/, handler/) file by file, every
import statement at any depth (a function's `import matplotlib` too), and import each other
module named. Prints one JSON object: the modules imported, those that failed (with why) and, for
each module, the files that import it.
"""
import ast
import importlib
import json
import sys
from pathlib import Path

APP = Path("/app")
OURS = {"core", "client", "handler"}


def our_file(module: str) -> Path | None:
    base = APP.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if node.module.split(".")[0] in OURS and our_file(f"{node.module}.{alias.name}"))
    return names


def main(commands: list[str]) -> None:
    sys.path.insert(0, str(APP))
    todo, seen, external, importers = [Path(c) for c in commands], set(), set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            importers.setdefault(name, []).append(str(path))
            if name.split(".")[0] in OURS:
                found = our_file(name)
                if found is None:
                    external.add(name)  # ours but missing from the image: importing it says so
                else:
                    todo.append(found)
            else:
                external.add(name)
    failed = {}
    for name in sorted(external):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the scan
            failed[name] = f"{type(e).__name__}: {e}"
    print(json.dumps({"files": sorted(str(p) for p in seen), "imported": sorted(set(external) - set(failed)),
                      "failed": failed, "importers": {n: sorted(set(importers[n])) for n in failed}}))


if __name__ == "__main__":
    main(sys.argv[1:])
