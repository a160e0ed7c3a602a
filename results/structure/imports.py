"""
The project's import graph, file by file (which of the project's modules each one imports, and where: at the top
of the file, or inside a function), from the files of a commit, and its cycles (imports inside functions counted;
extensions/ taken as one module).

    python results/structure/imports.py [COMMIT]     # default: the working tree
"""
import ast
import subprocess
import sys
from pathlib import Path

FILES = ["model.py", "distill.py", "data.py", "train.py", "eval.py", "flops.py", "analyze.py", "extensions/__init__.py",
         "extensions/prefixes.py", "extensions/anchors.py", "extensions/options.py", "extensions/signal.py"]
OURS = {"model", "distill", "data", "train", "eval", "flops", "analyze", "extensions"}


def source(path, commit):
    """A file's text at a commit (None where it does not exist), or in the working tree."""
    if commit is None:
        return Path(path).read_text() if Path(path).exists() else None
    done = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def imports(text):
    """{project module: 'top' or 'in a function'} imported by a file's text."""
    found = {}
    for node in ast.walk(ast.parse(text)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            root = name.split(".")[0]
            if root in OURS:
                where = "top" if node.col_offset == 0 else "in a function"
                key = name if root == "extensions" else root
                found[key] = "top" if found.get(key) == "top" else where
    return found


def cycles(graph):
    """The import cycles of {module: set of modules it imports}, each as a path that starts where it ends."""
    found = set()

    def walk(path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                i = path.index(min(path))  # one rotation per cycle
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path:
                walk(path + [nxt])
    for start in graph:
        walk([start])
    return [" -> ".join(c + (c[0],)) for c in sorted(found)]


def main(commit=None):
    graph = {}
    for path in FILES:
        text = source(path, commit)
        if text is not None:
            lines = len(text.splitlines())
            found = imports(text)
            print(f"{path:24s} {lines:4d} lines  imports " + (", ".join(f"{m}" + ("" if w == "top" else f" ({w})")
                                                               for m, w in sorted(found.items())) or "none"))
            module = path.split("/")[0].removesuffix(".py")
            graph.setdefault(module, set()).update(m.split(".")[0] for m in found if m.split(".")[0] != module)
    found = cycles(graph)
    print(f"{len(found)} import cycles" + "".join(f"\n  {c}" for c in found))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
