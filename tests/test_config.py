"""Config loading: defaults, path resolution, run options, and every validation error's exact message."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest

from rfreport import config
from rfreport.config import ModelSpec, RunOptions
from rfreport.errors import ConfigError

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
GOOD = """
[[model]]
name = "a"
factory = "rfreport.examples:dilated_net"
input_shape = [1, 3, 16, 16]
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    """Write a config file and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | list[Path]) -> str:
    """Return the ConfigError message that loading raises."""
    with pytest.raises(ConfigError) as caught:
        config.load(path if isinstance(path, list) else [path])
    return str(caught.value)


def test_minimal_model_gets_the_documented_defaults(tmp_path):
    path = write(tmp_path, GOOD)
    loaded = config.load([path])
    assert loaded.files == (path,)
    assert loaded.options == RunOptions()
    assert loaded.models == (ModelSpec(name="a", factory="rfreport.examples:dilated_net",
                                       input_shapes=((1, 3, 16, 16),), config_file=path),)


def test_defaults_apply_and_tables_merge_key_by_key(tmp_path):
    path = write(tmp_path, """
[defaults]
positions = "grid:2"
mode = "gradient"
input_shape = [1, 3, 16, 16]
kwargs = { width = 4, depth = 2 }
audit = { min_rf = 5, no_global = true }
erf = { samples = 8 }

[[model]]
name = "a"
factory = "rfreport.examples:dilated_net"
kwargs = { depth = 1 }
positions = ["center", [1, 2]]
audit = { min_rf = [7, 9] }
erf = { positions = "corners" }

[[model]]
name = "b"
factory = "rfreport.examples:se_net"
input_shape = [[1, 3, 8, 8], [1, 3, 12, 12]]
mode = "structural"
erf = false
""")
    a, b = config.load([path]).models
    assert a.kwargs == {"width": 4, "depth": 1}
    assert a.audit == {"min_rf": [7, 9], "no_global": True}
    assert a.erf == {"samples": 8, "positions": "corners"}
    assert (a.positions, a.mode, a.input_shapes) == (("center", (1, 2)), "gradient", ((1, 3, 16, 16),))
    assert (b.positions, b.mode, b.erf) == ("grid:2", "structural", None)
    assert b.input_shapes == ((1, 3, 8, 8), (1, 3, 12, 12))
    assert b.kwargs == {"width": 4, "depth": 2}


def test_every_model_key_is_read(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / "images").mkdir()
    path = write(tmp_path, """
[[model]]
name = "a"
factory = "rfreport.examples:unet"
kwargs = { width = 2 }
checkpoint = "weights.pt"
input_shape = [1, 3, 16, 16]
layer = "enc2"
output = 0
positions = "edges"
mode = "gradient"
audit = { max_edge_fraction = 0.5, min_fill = 1, max_center_offset = 2, no_unseen = true, max_rf = 40 }
erf = { samples = 4, positions = ["center"], distribution = "images", images = "images" }
image = "cat.png"
layers = ["enc1", "enc2"]
""")
    (spec,) = config.load([path]).models
    assert spec.checkpoint == tmp_path / "weights.pt"
    assert spec.image == tmp_path / "cat.png"
    assert spec.erf == {"samples": 4, "positions": ("center",), "distribution": "images", "images": tmp_path / "images"}
    assert (spec.layer, spec.output, spec.positions, spec.layers) == ("enc2", 0, "edges", ("enc1", "enc2"))
    assert spec.audit == {"max_edge_fraction": 0.5, "min_fill": 1.0, "max_center_offset": 2.0, "no_unseen": True,
                          "max_rf": 40}


def test_file_factory_resolves_against_the_config_folder_and_is_not_called(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    relative = os.path.relpath(DATA / "tiny_model.py", sub)
    path = write(sub, GOOD.replace("rfreport.examples:dilated_net", f"{relative}:broken"))
    (spec,) = config.load([path]).models
    assert spec.factory == f"{DATA / 'tiny_model.py'}:broken"


def test_file_factory_relative_path(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "mine.py").write_text((DATA / "tiny_model.py").read_text())
    path = write(tmp_path, GOOD.replace("rfreport.examples:dilated_net", "nets/mine.py:build"))
    monkeypatch.chdir(DATA)   # resolution must not depend on the working directory
    (spec,) = config.load([path]).models
    assert spec.factory == f"{tmp_path / 'nets' / 'mine.py'}:build"
    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(tmp_path / "nets" / "mine.py"))
    assert module.CALLS == []


def test_run_table_and_later_files_override(tmp_path):
    first = write(tmp_path, '[run]\nexecutor = "ray"\naddress = "ray://head:10001"\nseed = 4\n' + GOOD, "one.toml")
    second = write(tmp_path, '[run]\nseed = 7\nbatch_size = 64\ndevice = "cpu"\n' +
                   GOOD.replace('"a"', '"b"'), "two.toml")
    loaded = config.load([first, second])
    assert loaded.options == RunOptions(executor="ray", address="ray://head:10001", device="cpu", batch_size=64, seed=7)
    assert [m.name for m in loaded.models] == ["a", "b"]
    assert [m.config_file for m in loaded.models] == [first, second]


def test_specs_and_configs_pickle(tmp_path):
    loaded = config.load([write(tmp_path, GOOD.replace('[1, 3, 16, 16]', '[[1, 3, 16, 16], [1, 3, 8, 8]]'))])
    assert pickle.loads(pickle.dumps(loaded)) == loaded


def test_shipped_configs_load():
    examples = config.load([ROOT / "configs" / "examples.toml"])
    names = [m.name for m in examples.models]
    assert names == ["seed", "dilated", "unet", "resnet_small", "transposed", "circular", "squeeze_excite"]
    assert any(len(m.input_shapes) > 1 for m in examples.models)
    pytest.importorskip("torchvision")
    zoo = config.load([ROOT / "configs" / "torchvision.toml"])
    assert {"resnet18", "resnet50", "vgg16", "alexnet", "mobilenet_v2", "efficientnet_b0",
            "convnext_tiny"} <= {m.name for m in zoo.models}
    assert all(m.layer for m in zoo.models)


MODEL = "model 'a'"
ERRORS = [
    ('positons = "all"', MODEL, "key 'positons': unknown key (did you mean 'positions'?)"),
    ("layer = 3", MODEL, "key 'layer': must be a string, not integer 3"),
    ("kwargs = 3", MODEL, "key 'kwargs': must be a table, not integer 3"),
    ("output = true", MODEL, "key 'output': must be a string key or an integer index, not boolean True"),
    ('mode = "exact"', MODEL, "key 'mode': must be one of structural, gradient, not 'exact'"),
    ('positions = "middle"', MODEL, "key 'positions': unknown position selection 'middle'; use all, center, corners, "
                                    "edges, grid:K or a list of coordinates"),
    ('positions = "grid:0"', MODEL, "key 'positions': 'grid:0': the grid step K in grid:K must be a positive integer"),
    ("positions = [[1, 2, 3]]", MODEL, "key 'positions': position [1, 2, 3] must have 2 coordinates (one per "
                                       "spatial axis)"),
    ("positions = [[1, -2]]", MODEL, "key 'positions': position [1, -2] has a negative coordinate"),
    ("positions = []", MODEL, "key 'positions': must not be empty"),
    ("audit = { min_rff = 3 }", MODEL, "key 'audit.min_rff': unknown audit rule (did you mean 'audit.min_rf'?)"),
    ("audit = { min_receptive_field = 3 }", MODEL, "key 'audit.min_receptive_field': unknown audit rule (did you "
                                                   "mean 'audit.min_rf'?)"),
    ("audit = { max_receptive_field_in_input = 3 }", MODEL, "key 'audit.max_receptive_field_in_input': unknown "
                                                            "audit rule (did you mean 'audit.max_rf_in_input'?)"),
    ("audit = { min_stride = 0 }", MODEL, "key 'audit.min_stride': must be a positive number or a list of them, "
                                          "not 0"),
    ("audit = { max_stride = [8] }", MODEL, "key 'audit.max_stride': [8] must have 2 entries (one per spatial "
                                            "axis)"),
    ("audit = { min_rf = 0 }", MODEL, "key 'audit.min_rf': must be a positive integer or a list of them, not 0"),
    ("audit = { min_rf = [3] }", MODEL, "key 'audit.min_rf': [3] must have 2 entries (one per spatial axis)"),
    ("audit = { min_fill = 1.5 }", MODEL, "key 'audit.min_fill': must be between 0 and 1, not 1.5"),
    ('audit = { no_global = "yes" }', MODEL, "key 'audit.no_global': must be true or false, not string 'yes'"),
    ("audit = { max_center_offset = -1 }", MODEL, "key 'audit.max_center_offset': must be >= 0, not -1"),
    ("audit = { global_not_before = 6 }", MODEL, "key 'audit.global_not_before': must be a layer name (a qualified "
                                                 "submodule name, e.g. \"blocks.6\"), not integer 6"),
    ('audit = { global_not_before = "" }', MODEL, "key 'audit.global_not_before': must name a layer, not an empty "
                                                  "string"),
    ("erf = { sample = 3 }", MODEL, "key 'erf.sample': unknown ERF option (did you mean 'erf.samples'?)"),
    ("erf = { samples = 0 }", MODEL, "key 'erf.samples': must be a positive integer, not 0"),
    ('erf = { distribution = "images" }', MODEL, "key 'erf.distribution': 'images' needs an images folder "
                                                 "(erf.images)"),
    ('layers = ["a", 2]', MODEL, "key 'layers': must be a string, not integer 2"),
    ('name = ""', "model ''", "key 'name': must not be empty"),
]


@pytest.mark.parametrize(("line", "section", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_model_key_errors_name_file_model_and_key(tmp_path, line, section, message):
    path = write(tmp_path, GOOD.replace('name = "a"', 'name = "a"\n' + line, 1) if not line.startswith("name")
                 else GOOD.replace('name = "a"', line))
    assert error_of(path) == f"{path}: {section}: {message}"


SHAPE_ERRORS = [
    ("[3, 16]", "shape [3, 16] must be [N, C, *spatial] with 1 to 3 positive spatial sizes, e.g. [1, 3, 224, 224]"),
    ("[1, 3, 2, 2, 2, 2]", "shape [1, 3, 2, 2, 2, 2] must be [N, C, *spatial] with 1 to 3 positive spatial sizes, "
                           "e.g. [1, 3, 224, 224]"),
    ("[1, 3, 0, 16]", "shape [1, 3, 0, 16] must be [N, C, *spatial] with 1 to 3 positive spatial sizes, "
                      "e.g. [1, 3, 224, 224]"),
    ("[1, 3, 16.0, 16]", "must be a list of integers, not float 16.0"),
    ('"1,3,16,16"', "must be a shape like [1, 3, 224, 224] or a list of shapes, not string '1,3,16,16'"),
    ("[[1, 3, 16, 16], [1, 3, 16]]", "all shapes of a model must have the same number of spatial axes"),
    ("[[1, 3, 16, 16], [1, 3, 16, 16]]", "shape [1, 3, 16, 16] is listed twice"),
    ("[]", "must not be empty"),
]


@pytest.mark.parametrize(("shape", "message"), SHAPE_ERRORS, ids=[e[0] for e in SHAPE_ERRORS])
def test_shape_errors(tmp_path, shape, message):
    path = write(tmp_path, GOOD.replace("[1, 3, 16, 16]", shape))
    assert error_of(path) == f"{path}: model 'a': key 'input_shape': {message}"


FACTORY_ERRORS = [
    ("no_such_package.nets:build", "cannot import module 'no_such_package.nets' (ModuleNotFoundError: No module "
                                   "named 'no_such_package')"),
    ("rfreport.examples:no_such_net", "'rfreport.examples' has no attribute 'no_such_net'"),
    ("rfreport.examples", "'rfreport.examples' must be 'package.module:callable' or 'path/to/file.py:callable'"),
    ("rfreport.examples:", "'rfreport.examples:' must be 'package.module:callable' or 'path/to/file.py:callable'"),
]


@pytest.mark.parametrize(("factory", "message"), FACTORY_ERRORS, ids=[e[0] for e in FACTORY_ERRORS])
def test_factory_errors(tmp_path, factory, message):
    path = write(tmp_path, GOOD.replace("rfreport.examples:dilated_net", factory))
    assert error_of(path) == f"{path}: model 'a': key 'factory': {message}"


def test_file_factory_errors(tmp_path):
    for factory, message in [
        ("missing.py:build", f"factory file '{tmp_path / 'missing.py'}' does not exist"),
        (f"{DATA}/broken_import.py:build", f"cannot import '{DATA / 'broken_import.py'}' (RuntimeError: this file "
                                           "cannot be imported)"),
        (f"{DATA}/tiny_model.py:NOT_CALLABLE", f"{DATA / 'tiny_model.py'}:NOT_CALLABLE is a int, not a callable"),
    ]:
        path = write(tmp_path, GOOD.replace("rfreport.examples:dilated_net", factory))
        assert error_of(path) == f"{path}: model 'a': key 'factory': {message}"


def test_missing_required_keys_and_paths(tmp_path):
    path = write(tmp_path, GOOD.replace("input_shape = [1, 3, 16, 16]", ""))
    assert error_of(path) == f"{path}: model 'a': key 'input_shape': is required (in the model or in [defaults])"
    path = write(tmp_path, '[[model]]\nfactory = "rfreport.examples:unet"\ninput_shape = [1, 3, 8, 8]\n')
    assert error_of(path) == f"{path}: model #1: key 'name': is required (in the model or in [defaults])"
    path = write(tmp_path, GOOD + 'checkpoint = "nowhere.pt"\n')
    assert error_of(path) == (f"{path}: model 'a': key 'checkpoint': file 'nowhere.pt' does not exist "
                              f"({tmp_path / 'nowhere.pt'})")


def test_duplicate_names_within_and_across_files(tmp_path):
    path = write(tmp_path, GOOD + GOOD)
    assert error_of(path) == f"{path}: model 'a': key 'name': duplicate model name (first defined in {path})"
    other = write(tmp_path, GOOD, "other.toml")
    single = write(tmp_path, GOOD, "single.toml")
    assert error_of([single, other]) == (f"{other}: model 'a': key 'name': duplicate model name "
                                         f"(first defined in {single})")


def test_file_level_errors(tmp_path):
    path = write(tmp_path, "[[model]\nname = 1")
    assert error_of(path).startswith(f"{path}: not valid TOML (")
    assert error_of(tmp_path / "absent.toml").startswith(f"{tmp_path / 'absent.toml'}: cannot read the config (")
    path = write(tmp_path, "[defaults]\nmode = 'gradient'\n")
    assert error_of(path) == f"{path}: no [[model]] tables; nothing to run"
    path = write(tmp_path, "[model]\nname = 'a'\n")
    assert error_of(path) == f"{path}: top level: key 'model': must be an array of [[model]] tables, not table " \
                             "{'name': 'a'}"
    path = write(tmp_path, "[default]\nmode = 'gradient'\n" + GOOD)
    assert error_of(path) == f"{path}: top level: key 'default': unknown table (did you mean 'defaults'?)"
    path = write(tmp_path, "[defaults]\nname = 'x'\n" + GOOD)
    assert error_of(path) == f"{path}: [defaults]: key 'name': a name cannot have a default; give each model its own"
    path = write(tmp_path, "[defaults]\nlayer = 1\n" + GOOD)
    assert error_of(path) == f"{path}: [defaults]: key 'layer': must be a string, not integer 1"
    path = write(tmp_path, "[run]\nexecutor = 'slurm'\n" + GOOD)
    assert error_of(path) == f"{path}: [run]: key 'executor': must be one of local, ray, not 'slurm'"
    path = write(tmp_path, "[run]\nbatch_size = 0\n" + GOOD)
    assert error_of(path) == f"{path}: [run]: key 'batch_size': must be a positive integer, not 0"
    path = write(tmp_path, "[run]\nthreads = 2\n" + GOOD)
    assert error_of(path) == f"{path}: [run]: key 'threads': unknown key (allowed: executor, address, device, " \
                             "batch_size, seed, job_timeout, workers)"
    assert error_of([]) == "no config file given"


def test_validation_builds_no_model(tmp_path):
    """Every model is validated before any is built: an error in the last model stops the load."""
    (tmp_path / "mine.py").write_text((DATA / "tiny_model.py").read_text())
    path = write(tmp_path, GOOD.replace("rfreport.examples:dilated_net", "mine.py:build") +
                 GOOD.replace('"a"', '"b"').replace("[1, 3, 16, 16]", "[1, 3]"))
    assert "model 'b': key 'input_shape'" in error_of(path)
    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(tmp_path / "mine.py"))
    assert module.CALLS == []


def test_the_documented_example_loads(tmp_path):
    pytest.importorskip("torchvision")
    text = (ROOT / "docs" / "config.md").read_text()
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    python = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "zoo.py").write_text(python)
    resnet, deeplab = config.load([write(tmp_path, toml)]).models
    assert resnet.audit == {"max_edge_fraction": 0.5, "min_rf": 200, "no_global": True}
    assert resnet.input_shapes == ((1, 3, 224, 224), (1, 3, 512, 512))
    assert (deeplab.output, deeplab.mode, deeplab.input_shapes) == ("out", "gradient", ((1, 3, 256, 256),))
