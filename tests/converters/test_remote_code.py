"""converters/remote_code.py: what a remote-code folder defines, read with ``ast``. The reference is
the same folder imported for real (the code written here is ours): the classes ``auto_map`` names
must be the config class with that ``model_type`` and the most derived model class using it."""
from __future__ import annotations

import importlib.util
import random
import sys

import pytest

from sa2va_hooks.converters.remote_code import RemoteCodeError, read_remote_code, read_template_names

CONFIG = '''
class PretrainedConfig:
    pass


class {cfg}(PretrainedConfig):
    model_type = "{mt}"


class OtherConfig(PretrainedConfig):
    model_type: str = "other_{mt}"
'''
MODEL = '''
from configuration_{tag} import {cfg}, OtherConfig


class Base:
    config_class = {cfg}


class {model}(Base):
    pass


class Other:
    config_class = OtherConfig
'''
TEMPLATES = '''
PROMPT_TEMPLATE = dict({kw})
LITERAL = {{{lit}}}
COMPUTED = dict(**{{"x": 1}})
'''


def _write(tmp_path, seed: int):
    rnd = random.Random(seed)
    tag = f"m{seed}"
    names = {"cfg": f"Cfg{rnd.randrange(10 ** 6)}", "model": f"Model{rnd.randrange(10 ** 6)}",
             "mt": f"type_{rnd.randrange(10 ** 6)}", "tag": tag}
    (tmp_path / f"configuration_{tag}.py").write_text(CONFIG.format(**names))
    (tmp_path / f"modeling_{tag}.py").write_text(MODEL.format(**names))
    (tmp_path / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    return names


def _import(tmp_path, module: str):
    sys.path.insert(0, str(tmp_path))
    try:
        spec = importlib.util.spec_from_file_location(module, tmp_path / f"{module}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_map_names_the_classes_the_imported_code_defines(tmp_path, seed):
    n = _write(tmp_path, seed)
    code = read_remote_code(tmp_path)
    auto = code.auto_map(n["mt"])
    assert auto == {"AutoConfig": f"configuration_{n['tag']}.{n['cfg']}",
                    "AutoModel": f"modeling_{n['tag']}.{n['model']}",
                    "AutoModelForCausalLM": f"modeling_{n['tag']}.{n['model']}"}
    assert code.missing(auto) == []
    # the reference: the real classes behind those names
    cfg_mod = _import(tmp_path, f"configuration_{n['tag']}")
    model_mod = _import(tmp_path, f"modeling_{n['tag']}")
    try:
        cfg_cls = getattr(cfg_mod, auto["AutoConfig"].rsplit(".", 1)[1])
        model_cls = getattr(model_mod, auto["AutoModel"].rsplit(".", 1)[1])
        assert cfg_cls.model_type == n["mt"] and model_cls.config_class.__name__ == cfg_cls.__name__
        subclasses = [c for c in vars(model_mod).values() if isinstance(c, type) and issubclass(c, model_cls)]
        assert subclasses == [model_cls]  # the most derived one
    finally:
        sys.modules.pop(f"configuration_{n['tag']}", None)
        sys.modules.pop(f"modeling_{n['tag']}", None)


def test_an_unknown_model_type_lists_the_config_classes_found(tmp_path):
    n = _write(tmp_path, 5)
    with pytest.raises(RemoteCodeError, match=rf"defines 0 config classes with model_type 'nope' .*{n['cfg']} "
                                              rf"\(model_type '{n['mt']}'\).*pass auto_map="):
        read_remote_code(tmp_path).auto_map("nope")


def test_missing_names_the_entries_the_code_lacks(tmp_path):
    n = _write(tmp_path, 6)
    code = read_remote_code(tmp_path)
    ref = f"modeling_{n['tag']}.{n['model']}"
    assert code.find(ref).config_class is None and code.find(ref).bases == ("Base",)
    assert code.missing({"AutoModel": ref, "AutoConfig": "configuration_x.Gone"}) == ["AutoConfig=configuration_x.Gone"]


def test_a_folder_that_is_missing_empty_or_broken_is_refused(tmp_path):
    with pytest.raises(RemoteCodeError, match="does not exist"):
        read_remote_code(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.py").write_text("x = 1\n")
    with pytest.raises(RemoteCodeError, match="has no Python classes"):
        read_remote_code(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "modeling_b.py").write_text("class A(:\n")
    with pytest.raises(RemoteCodeError, match=r"modeling_b.py cannot be parsed"):
        read_remote_code(tmp_path / "broken")


def test_template_names_equal_the_keys_of_the_evaluated_table(tmp_path):
    rnd = random.Random(3)
    keys = [f"t{rnd.randrange(10 ** 6)}_{i}" for i in range(4)]
    (tmp_path / "templates.py").write_text(TEMPLATES.format(kw=", ".join(f"{k}={i}" for i, k in enumerate(keys)),
                                                            lit=", ".join(f"'{k}': 0" for k in keys[:2])))
    ns: dict = {}
    exec((tmp_path / "templates.py").read_text(), ns)
    assert read_template_names(tmp_path, "templates.PROMPT_TEMPLATE") == set(ns["PROMPT_TEMPLATE"]) == set(keys)
    assert read_template_names(tmp_path, "templates.LITERAL") == set(ns["LITERAL"])
    assert read_template_names(tmp_path, "templates.COMPUTED") is None  # not readable without running it
    assert read_template_names(tmp_path, "templates.ABSENT") is None
    assert read_template_names(tmp_path, "nofile.PROMPT_TEMPLATE") is None
