"""Flag Python that behaves differently, or not at all, on MicroPython.

Each rule is a trap seen on the unix and WebAssembly ports: code that
CPython runs happily but MicroPython rejects, or worse, runs with another
result. A line may opt out of a rule with ``# dialect: ok <rule>`` and a
reason next to it.

usage: python tests/micro/dialect.py FILE...
"""

import ast
import sys
from pathlib import Path

# Standard modules the portable core may import: all exist on both ports
# with the calls the core makes.
CORE_IMPORTS = frozenset({"binascii", "json", "math", "os"})

_HASH_WORDS = ("hash", "sha", "md5", "digest")
_ORDER_METHODS = ("keys", "items", "values")
_EPOCH_CALLS = ("gmtime", "localtime", "mktime")
_KEYWORD_SHY = ("from_bytes", "to_bytes", "split", "rsplit")


def check_source(source: str, name: str, core: bool = False) -> list[str]:
    """Problems in ``source``, each as ``name:line: rule: what``."""
    tree = ast.parse(source, name)
    lines = source.splitlines()
    checker = _Checker(core)
    checker.visit(tree)
    problems = []
    for line, rule, what in sorted(checker.found):
        text = lines[line - 1] if line <= len(lines) else ""
        if "dialect: ok " + rule in text:
            continue
        problems.append(f"{name}:{line}: {rule}: {what}")
    return problems


def check_file(path: Path, core: bool = False) -> list[str]:
    return check_source(path.read_text(), str(path), core)


class _Checker(ast.NodeVisitor):
    def __init__(self, core: bool) -> None:
        self.core = core
        self.found: list[tuple[int, str, str]] = []
        self.sorted_args: set[int] = set()

    def flag(self, node: ast.AST, rule: str, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), rule, what))

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = _call_name(function)
        for keyword in node.keywords:
            if keyword.arg == "sort_keys":
                self.flag(node, "sort-keys", "json.dumps has no sort_keys")
        if name in _KEYWORD_SHY and node.keywords:
            self.flag(node, "keywords", name + "() takes no keywords")
        if name == "pow" and len(node.args) == 3:
            self._check_pow(node)
        if (
            name == "isinstance"
            and len(node.args) == 2
            and _mentions_int(node.args[1])
        ):
            self.flag(node, "bool-int", "isinstance(x, int) and bools")
        if name == "sorted":
            for arg in node.args:
                self.sorted_args.add(id(arg))
        if name in _EPOCH_CALLS or (
            name == "time" and _owner(function) == "time"
        ):
            self.flag(node, "epoch", name + "() assumes the 1970 epoch")
        if name == "copy" and isinstance(function, ast.Attribute):
            owner = ast.unparse(function.value).lower()
            if any(word in owner for word in _HASH_WORDS):
                self.flag(node, "hash-copy", "hash objects have no copy()")
        if (
            name in _ORDER_METHODS
            and isinstance(function, ast.Attribute)
            and not node.args
            and id(node) not in self.sorted_args
        ):
            self.flag(node, "dict-order", "dict order differs; sort it")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("bit_length", "hexdigest"):
            self.flag(node, node.attr, node.attr + " does not exist")
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_import(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._check_import(node, node.module)

    def visit_If(self, node: ast.If) -> None:
        # Imports for the type checker never run on a board.
        if ast.unparse(node.test) == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _check_import(self, node: ast.AST, module: str) -> None:
        if self.core and module.split(".", maxsplit=1)[0] not in CORE_IMPORTS:
            self.flag(node, "import", module + " is not for the core")
        if module.split(".", maxsplit=1)[0] in (
            "datetime",
            "typing",
            "dataclasses",
        ):
            self.flag(node, "import", module + " is not on MicroPython")

    def _check_pow(self, node: ast.Call) -> None:
        exponent = node.args[1]
        if (
            isinstance(exponent, ast.UnaryOp)
            and isinstance(exponent.op, ast.USub)
        ) or (
            isinstance(exponent, ast.Constant)
            and (isinstance(exponent.value, int) and exponent.value < 0)
        ):
            self.flag(node, "pow-negative", "pow(x, -e, m) returns 0")


def _call_name(function: ast.expr) -> str:
    if isinstance(function, ast.Name):
        return function.id
    if isinstance(function, ast.Attribute):
        return function.attr
    return ""


def _owner(function: ast.expr) -> str:
    if isinstance(function, ast.Attribute):
        return ast.unparse(function.value)
    return ""


def _mentions_int(types: ast.expr) -> bool:
    if isinstance(types, ast.Name):
        return types.id == "int"
    if isinstance(types, ast.Tuple):
        return any(_mentions_int(item) for item in types.elts)
    return False


def main(paths: list[str]) -> int:
    problems = []
    for path in paths:
        problems += check_file(Path(path), core="/core/" in path)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
