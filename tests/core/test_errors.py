"""The one error tree (``sa2va_hooks/core/errors.py``): every exception class the package defines
derives from ``Sa2vaHooksError`` through exactly one category, and every ``raise`` in the package
raises one of them, except the documented pass-throughs. Read from the source (AST), so a new
``raise ValueError(...)`` anywhere fails here."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import sa2va_hooks
from sa2va_hooks.core import errors
from sa2va_hooks.core.errors import BadInputError, ExportFailedError, MismatchError, Sa2vaHooksError, exit_code

PACKAGE = Path(sa2va_hooks.__file__).parent
CATEGORIES = (BadInputError, MismatchError, ExportFailedError)
# raised on purpose as what they are: the module protocol (__getattr__), and an OS error re-raised
# with the file it happened on (``with_path``, ``renameat2``: the errno is the information)
PASS_THROUGH = {("__init__.py", "AttributeError"), ("__init__.py", "ImportError"), ("core/writer.py", "OSError"),
                ("diff.py", "OSError")}
# functions that build the error raised (checked by their return annotation below); with_path
# re-raises an OS error naming its file (the pass-through above)
FACTORIES = {"with_path"}


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], "sa2va_hooks."):
        if not info.name.endswith("__main__"):  # importing it runs the CLI
            yield importlib.import_module(info.name)


def _defined_exceptions():
    for mod in _modules():
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == mod.__name__:
                yield cls


def test_every_exception_class_of_the_package_has_the_base_and_one_category():
    found = list(_defined_exceptions())
    assert len(found) >= 25  # the walk saw the package
    for cls in found:
        if cls is Sa2vaHooksError or cls in CATEGORIES:
            continue
        assert issubclass(cls, Sa2vaHooksError), cls
        assert sum(issubclass(cls, c) for c in CATEGORIES) == 1 or cls is errors.InternalError, cls


def test_every_raise_in_the_package_raises_a_package_error():
    names = {n for n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Sa2vaHooksError)}
    for mod in _modules():
        names |= {n for n, c in vars(mod).items() if inspect.isclass(c) and issubclass(c, Sa2vaHooksError)}
    factories = {}  # module -> function name -> the error class its return annotation names
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.returns is not None:
                factories.setdefault(path.relative_to(PACKAGE).as_posix(), {})[node.name] = ast.unparse(node.returns)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue  # a bare re-raise or a raise of a caught exception object
            raised = ast.unparse(node.exc.func)
            if raised.split(".")[-1] in names or (rel, raised) in PASS_THROUGH or raised in FACTORIES:
                continue
            if raised in factories.get(rel, {}) and factories[rel][raised] in names:
                continue
            offenders.append(f"{rel}:{node.lineno}: raise {raised}(...)")
    assert offenders == [], "\n".join(offenders)


def test_categories_carry_the_cli_exit_codes_and_builtin_bases_stay():
    from sa2va_hooks.converters.base import resolve_converter
    from sa2va_hooks.core.finish import ExportVerificationError
    from sa2va_hooks.core.loadcheck import SnapshotLoadError
    from sa2va_hooks.offline.checkpoint_io import UnsafeCheckpointError
    assert exit_code(UnsafeCheckpointError("x")) == 2 and isinstance(UnsafeCheckpointError("x"), RuntimeError)
    assert exit_code(SnapshotLoadError("x")) == 1 and exit_code(ExportVerificationError("x")) == 1
    assert exit_code(OSError(28, "No space left on device")) == 2  # not ours: the command could not run
    try:
        resolve_converter("no_such_converter", None)
    except KeyError as e:  # still a KeyError for callers that catch one, with a readable message
        assert exit_code(e) == 2 and str(e).startswith("unknown converter 'no_such_converter'")
    else:
        raise AssertionError("an unknown converter was accepted")
