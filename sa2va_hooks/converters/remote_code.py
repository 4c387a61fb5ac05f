"""What a remote-code directory (``hf_code_dir``) defines, read from its source with ``ast``.

Why not import it: loading a checkpoint or checking an export must run no code the user did not ask
to run, and this check happens in ``before_train`` and before ``tools/export.py`` writes a byte. So
the classes are found by their declarations:
- a config class declares ``model_type = "..."`` in its body;
- a model class declares ``config_class = SomeConfig``.
``auto_map`` then names ``module.Class`` of the one config class with the wanted ``model_type`` and
the one model class whose ``config_class`` is it (Sa2VA: ``configuration_sa2va_chat.Sa2VAChatConfig``
and ``modeling_sa2va_chat.Sa2VAChatModel`` for InternVL; ``...Sa2VAChatConfigQwen`` and
``modeling_sa2va_qwen.Sa2VAChatModelQwen`` for Qwen-VL). The template table
(``templates.PROMPT_TEMPLATE``) is read the same way, where it is a literal ``dict(...)``/``{...}``.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from ..core.errors import BadInputError


class RemoteCodeError(BadInputError, ValueError):
    """The remote-code directory does not define what the snapshot's config.json must name."""


@dataclasses.dataclass(frozen=True)
class CodeClass:
    module: str  # file name without .py
    name: str
    bases: tuple[str, ...]  # the last dotted part of each base, as written
    model_type: str | None
    config_class: str | None

    @property
    def ref(self) -> str:
        return f"{self.module}.{self.name}"


@dataclasses.dataclass(frozen=True)
class RemoteCode:
    directory: Path
    classes: tuple[CodeClass, ...]

    def config_classes(self, model_type: str | None = None) -> list[CodeClass]:
        return [c for c in self.classes
                if c.model_type is not None and (model_type is None or c.model_type == model_type)]

    def find(self, ref: str) -> CodeClass | None:
        return next((c for c in self.classes if c.ref == ref), None)

    def auto_map(self, model_type: str) -> dict[str, str]:
        """AutoConfig / AutoModel / AutoModelForCausalLM as Sa2VA's converter writes them."""
        configs = self.config_classes(model_type)
        if len(configs) != 1:
            found = ", ".join(f"{c.ref} (model_type {c.model_type!r})" for c in self.config_classes()) or "none"
            raise RemoteCodeError(
                f"{self.directory} defines {len(configs)} config classes with model_type {model_type!r} (config "
                f"classes found: {found}); pass auto_map=dict(AutoConfig='module.Class', AutoModel='module.Class') "
                "to the converter, or point hf_code_dir at the model family's HF code folder.")
        config = configs[0]
        models = self._leaves([c for c in self.classes if self._config_class_of(c) == config.name])
        if len(models) != 1:
            raise RemoteCodeError(
                f"{self.directory} defines {len(models)} model classes with config_class = {config.name} "
                f"({', '.join(c.ref for c in models) or 'none'}); pass auto_map=dict(AutoConfig={config.ref!r}, "
                "AutoModel='module.Class') to the converter.")
        return {"AutoConfig": config.ref, "AutoModel": models[0].ref, "AutoModelForCausalLM": models[0].ref}

    def _config_class_of(self, cls: CodeClass, depth: int = 0) -> str | None:
        """Declared, or inherited from a base class defined in this code (a subclass that adds Sa2VA's
        parts to a base chat model declares nothing)."""
        if cls.config_class or depth > 20:
            return cls.config_class
        for base in cls.bases:
            parent = next((c for c in self.classes if c.name == base), None)
            found = parent and self._config_class_of(parent, depth + 1)
            if found:
                return found
        return None

    @staticmethod
    def _leaves(classes: list[CodeClass]) -> list[CodeClass]:
        """Of classes related by inheritance, the most derived: the one the model is."""
        names = {c.name for c in classes}
        subclassed = {b for c in classes for b in c.bases if b in names}
        return [c for c in classes if c.name not in subclassed]

    def missing(self, auto_map: dict[str, str]) -> list[str]:
        """The auto_map entries this code does not define."""
        return [f"{key}={ref}" for key, ref in auto_map.items() if self.find(ref) is None]


def read_remote_code(code_dir: str | Path) -> RemoteCode:
    directory = Path(code_dir)
    if not directory.is_dir():
        raise RemoteCodeError(f"hf_code_dir {directory} does not exist; point it at the directory with the model's "
                              "modeling_*.py and configuration_*.py "
                              "(for Sa2VA: its projects/sa2va/hf/<family> folder).")
    classes: list[CodeClass] = []
    for path in sorted(directory.glob("*.py")):
        if path.name == "__init__.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError) as e:
            raise RemoteCodeError(f"remote code {path} cannot be parsed ({e}); fix the file or hf_code_dir") from e
        classes += [_code_class(path.stem, node) for node in tree.body if isinstance(node, ast.ClassDef)]
    if not classes:
        raise RemoteCodeError(f"hf_code_dir {directory} has no Python classes; point it at the directory with the "
                              "model's modeling_*.py and configuration_*.py.")
    return RemoteCode(directory, tuple(classes))


def _code_class(module: str, node: ast.ClassDef) -> CodeClass:
    assigned: dict[str, ast.expr] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            assigned[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            assigned[stmt.target.id] = stmt.value
    model_type = assigned.get("model_type")
    config_class = assigned.get("config_class")
    return CodeClass(
        module=module, name=node.name, bases=tuple(_last_name(b) for b in node.bases),
        model_type=(model_type.value if isinstance(model_type, ast.Constant) and isinstance(model_type.value, str)
                    else None),
        config_class=_last_name(config_class) if config_class is not None else None)


def _last_name(expr: ast.expr) -> str:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return ast.unparse(expr)


def read_template_names(code_dir: str | Path, table: str) -> set[str] | None:
    """Keys of ``table`` (``module.NAME``) in the remote code, where it is a literal dict; None
    when it cannot be read without running the code (the load check then decides)."""
    module, name = table.rsplit(".", 1)
    path = Path(code_dir) / f"{module}.py"
    if not path.is_file():
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys):
                return {k.value for k in value.keys}  # type: ignore[union-attr]
            if isinstance(value, ast.Call) and not value.args and all(k.arg for k in value.keywords):
                return {k.arg for k in value.keywords}  # type: ignore[misc]
    return None
