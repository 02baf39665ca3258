"""The shape the redesign promised, checked on every run: small functions, few parameters, thin commands.

* no function in ``quantcli/`` over 80 lines or with more than 8 parameters (``self``/``cls`` excluded);
* Typer commands (functions under ``@app.command``) may declare any number of options, but their bodies
  (after the docstring) stay at most 30 lines: parse into a request, call the library, render;
* protobuf is built only in ``quantcli/graph/`` (ruff's banned-api rule says the same; this test also catches
  ``onnx.helper`` reached through an alias).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantcli"
MAX_LINES, MAX_PARAMS, MAX_COMMAND_BODY = 80, 8, 30


def _functions() -> list[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((path, node))
    return found


def _is_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for deco in fn.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr in ("command", "callback"):
            return True
    return False


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def test_no_function_is_long_or_takes_many_parameters() -> None:
    problems = []
    for path, fn in _functions():
        where = f"{path.relative_to(PACKAGE.parent)}:{fn.lineno} {fn.name}"
        if _is_command(fn):
            if _body_lines(fn) > MAX_COMMAND_BODY:
                problems.append(f"{where}: command body {_body_lines(fn)} lines > {MAX_COMMAND_BODY}")
            continue
        length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
        if length > MAX_LINES:
            problems.append(f"{where}: {length} lines > {MAX_LINES}")
        if _params(fn) > MAX_PARAMS:
            problems.append(f"{where}: {_params(fn)} parameters > {MAX_PARAMS}")
    assert not problems, "\n".join(problems)


_PROTO_FIELDS = {"node", "initializer", "input", "output", "attribute", "value_info", "opset_import", "dims"}
_PROTO_METHODS = {"CopyFrom", "MergeFrom", "ClearField", "ParseFromString", "MergeFromString"}


def _is_field(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in _PROTO_FIELDS


def _field(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else "?"


def _protobuf_edits(tree: ast.AST) -> list[tuple[int, str]]:
    """Places that build or mutate protobuf: proto methods, ``onnx.helper``/``numpy_helper`` builders,
    writes into the repeated fields of graphs and nodes (``node.input[0] = x``, ``graph.node.append``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            if attr in _PROTO_METHODS:
                found.append((node.lineno, attr))
            elif attr.startswith("make_") or attr in ("from_array", "from_dict", "from_list"):
                if isinstance(owner, ast.Name) and owner.id in ("helper", "numpy_helper"):
                    found.append((node.lineno, f"{owner.id}.{attr}"))
                elif isinstance(owner, ast.Attribute) and owner.attr in ("helper", "numpy_helper"):
                    found.append((node.lineno, f"{owner.attr}.{attr}"))
            elif attr in ("append", "extend", "add", "remove", "insert", "pop") and _is_field(owner):
                found.append((node.lineno, f".{_field(owner)}.{attr}"))
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Subscript) and _is_field(target.value):
                found.append((node.lineno, f".{_field(target.value)}[...] ="))
        if isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and _is_field(target.value):
                    found.append((node.lineno, f"del .{_field(target.value)}[...]"))
    return found


def test_protobuf_is_built_and_edited_only_in_the_graph_layer() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "graph":
            continue
        for line, what in _protobuf_edits(ast.parse(path.read_text(), str(path))):
            problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
    assert not problems, "protobuf edited outside quantcli/graph/ (use quantcli.graph.editor):\n" + "\n".join(problems)


def test_the_protobuf_check_sees_edits() -> None:
    source = (
        "import onnx\n"
        "from onnx import helper\n"
        "def f(model, node, arr):\n"
        "    node.input[0] = 'x'\n"
        "    model.graph.node.append(helper.make_node('Relu', ['a'], ['b']))\n"
        "    model.graph.initializer.extend([onnx.numpy_helper.from_array(arr)])\n"
        "    copy = onnx.ModelProto(); copy.CopyFrom(model)\n"
        "    del model.graph.node[0]\n"
    )
    kinds = [what for _, what in _protobuf_edits(ast.parse(source))]
    assert kinds.count(".input[...] =") == 1 and "helper.make_node" in kinds and ".node.append" in kinds
    assert "numpy_helper.from_array" in kinds and "CopyFrom" in kinds and "del .node[...]" in kinds


def test_the_shape_check_sees_a_violation(tmp_path: Path) -> None:
    source = "def f(a, b, c, d, e, f, g, h, i):\n" + "    x = 1\n" * 90
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert _params(fn) == 9 and (fn.end_lineno or 0) - fn.lineno + 1 == 91
