"""Model loading (factories, checkpoints, errors) and the example architectures' findings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rfreport import config, examples, factories
from rfreport.compute import models
from rfreport.compute.sweep import sweep
from rfreport.config import ModelSpec
from rfreport.errors import ModelLoadError
from rfreport.positions import center

DATA = Path(__file__).parents[1] / "data"
TINY = f"{DATA / 'tiny_model.py'}:build"
EXAMPLES = Path(__file__).parents[2] / "configs" / "examples.toml"


def spec(factory: str = TINY, **fields) -> ModelSpec:
    """Return a spec named 'tiny' for a factory."""
    return ModelSpec(name="tiny", factory=factory, input_shapes=((1, 1, 8, 8),), **fields)


def error_of(model_spec: ModelSpec) -> str:
    """Return the ModelLoadError message that building raises."""
    with pytest.raises(ModelLoadError) as caught:
        models.build(model_spec)
    return str(caught.value)


def test_build_from_module_and_file_in_eval_mode():
    model = models.build(spec("rfreport.examples:resnet_small", kwargs={"width": 4, "blocks": 1}))
    assert isinstance(model, examples.ResNetSmall) and not model.training
    assert not any(m.training for m in model.modules())
    tiny = models.build(spec(kwargs={"channels": 5, "kernel": 2}))
    assert [tuple(p.shape) for p in tiny.parameters()] == [(5, 1, 2, 2), (5,), (1, 5, 2, 2), (1,)]


def test_factory_errors_name_the_model_and_factory():
    broken = f"{DATA / 'tiny_model.py'}:broken"
    assert error_of(spec(broken, kwargs={"channels": 3})) == (
        f"model 'tiny': factory {broken} raised ValueError: channels must be even, got 3")
    assert error_of(spec(kwargs={"colour": 3})) == (
        f"model 'tiny': factory {TINY} raised TypeError: build() got an unexpected keyword argument 'colour'")
    other = f"{DATA / 'tiny_model.py'}:not_a_model"
    assert error_of(spec(other)) == f"model 'tiny': factory {other} returned a dict, not a torch.nn.Module"
    assert error_of(spec("no_such_package:net")) == (
        "model 'tiny': cannot import module 'no_such_package' (ModuleNotFoundError: No module named "
        "'no_such_package')")


def test_a_factory_file_importing_a_module_beside_it_says_how_to_reach_it(tmp_path, monkeypatch):
    (tmp_path / "blocks.py").write_text("from torch import nn\n\n\ndef net():\n    return nn.Conv2d(1, 1, 3)\n")
    (tmp_path / "nets.py").write_text("from blocks import net\n")
    factory = f"{tmp_path / 'nets.py'}:net"
    assert error_of(spec(factory)) == (
        f"model 'tiny': cannot import {str(tmp_path / 'nets.py')!r} (ModuleNotFoundError: No module named 'blocks'); "
        f"'blocks' lies beside it, but a factory file's folder is not on the import path: set "
        f"PYTHONPATH={tmp_path} or name the factory as a module (package.module:callable)")
    monkeypatch.syspath_prepend(str(tmp_path))   # what PYTHONPATH does
    assert isinstance(models.build(spec(factory)), nn.Conv2d)
    (tmp_path / "other.py").write_text("import no_such_module_anywhere\n")
    assert "lies beside it" not in error_of(spec(f"{tmp_path / 'other.py'}:net"))


def test_checkpoint_loads_weights(tmp_path):
    source = models.build(spec())
    with torch.no_grad():
        for i, param in enumerate(source.parameters()):
            param.copy_(torch.arange(param.numel(), dtype=param.dtype).reshape(param.shape) + i)
    for name, payload in [("plain.pt", source.state_dict()), ("wrapped.pt", {"state_dict": source.state_dict(),
                                                                             "epoch": 3})]:
        torch.save(payload, tmp_path / name)
        loaded = models.build(spec(checkpoint=tmp_path / name))
        for mine, theirs in zip(loaded.state_dict().values(), source.state_dict().values(), strict=True):
            assert torch.equal(mine, theirs)
        assert not loaded.training


def test_checkpoint_mismatches_are_model_load_errors(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(models.build(spec(kwargs={"channels": 3})).state_dict(), path)
    assert error_of(spec(checkpoint=path)) == (
        f"model 'tiny': checkpoint '{path}' does not match the model: 3 shape mismatch(es) "
        "(0.weight (3, 1, 3, 3) vs (2, 1, 3, 3), 0.bias (3,) vs (2,), 2.weight (1, 3, 3, 3) vs (1, 2, 3, 3))")
    partial = {k: v for k, v in models.build(spec()).state_dict().items() if k != "2.bias"}
    torch.save({**partial, "extra": torch.zeros(1)}, path)
    assert error_of(spec(checkpoint=path)) == (
        f"model 'tiny': checkpoint '{path}' does not match the model: 1 missing key(s) (2.bias); "
        "1 unexpected key(s) (extra)")
    torch.save([1, 2], path)
    assert error_of(spec(checkpoint=path)) == (
        f"model 'tiny': checkpoint '{path}' holds a list, not a state_dict of tensors")
    path.write_bytes(b"not a checkpoint")
    assert error_of(spec(checkpoint=path)).startswith(f"model 'tiny': cannot load checkpoint '{path}' (")


class Pickled(nn.Module):
    """A whole pickled module: weights_only loading refuses it."""


def test_checkpoint_is_loaded_weights_only(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(Pickled(), path)
    assert "cannot load checkpoint" in error_of(spec(checkpoint=path))


def test_import_factory_does_not_call():
    factory = factories.import_factory(TINY)
    module = sys.modules[factory.__module__]
    calls = len(module.CALLS)
    factories.import_factory(TINY)
    assert len(module.CALLS) == calls
    assert factories.import_factory("rfreport.examples:UNet.forward") is examples.UNet.forward


def test_every_example_in_the_shipped_config_builds():
    for model_spec in config.load([EXAMPLES]).models:
        model = models.build(model_spec)
        assert isinstance(model, nn.Module) and not model.training


# The examples' findings, each against an independent derivation of the architecture's geometry.

def test_seed_stack_matches_the_seed_readme_and_skips_columns():
    model = examples.seed_convs()
    result = sweep(model, (1, 1, 60, 130), "all")
    row = np.flatnonzero((result.positions == (3, 10)).all(axis=1))[0]
    assert (result.lo[row].tolist(), result.hi[row].tolist()) == ([3, 24], [51, 66])   # the README's numbers
    columns = np.arange(130)
    assert (result.coverage[:, columns % 3 != 0] == 0).all()       # a (7, 1) kernel at stride 3 reads 1 column in 3
    assert (result.coverage[:58, columns % 3 == 0] > 0).all()
    assert (result.coverage[58:] == 0).all()                        # 18 windows of 7 rows at stride 3 end at row 57
    assert result.support[row] == result.support.max() == 49 * 15   # 49 rows x 15 of the 43 box columns


def test_dilated_net_has_gridding_holes():
    result = sweep(examples.dilated_net(depth=3), (1, 3, 32, 32), "all", keep_masks="center")
    mid = center((32, 32))
    mask = result.masks[mid]
    rows, cols = np.nonzero(mask)
    assert ((rows - mid[0]) % 2 == 0).all() and ((cols - mid[1]) % 2 == 0).all()
    assert mask.sum() == 7 * 7 and (result.size[result.positions.tolist().index(list(mid))] == 13).all()
    assert (result.support < np.prod(result.size, axis=1)).all()   # every position's box has holes


def test_unet_rf_moves_in_blocks_of_four():
    """The deepest path bounds the RF: convs (+-2), 2x nearest upsamplings (//2), max-pools (x2) unrolled by hand."""
    cols = np.arange(64)
    result = sweep(examples.unet(), (1, 3, 64, 64), [[32, w] for w in cols])
    low = ((cols - 2) // 2 - 2) // 2 - 2            # first bottom-level index, through dec1, up, dec2, up, bottom
    high = ((cols + 2) // 2 + 2) // 2 + 2
    assert result.output_shape[2:] == (64, 64)
    assert result.lo[:, 1].tolist() == np.maximum(4 * low - 6, 0).tolist()     # pool, enc2, pool, enc1
    assert result.hi[:, 1].tolist() == np.minimum(4 * high + 9, 63).tolist()
    assert set(np.diff(result.lo[24:, 1]).tolist()) == {0, 4}                 # non-affine: steps of 0 and 4


def test_resnet_rf_outgrows_a_small_input():
    small = sweep(examples.resnet_small(), (1, 3, 32, 32), "all", layer="stages")
    touching = ((small.lo == 0) | (small.hi == 31)).any(axis=1)
    assert touching.all()                     # every position's RF meets the border
    large = sweep(examples.resnet_small(), (1, 3, 96, 96), "center", layer="stages")
    assert (large.size[0] > 32).all()         # its centre RF is larger than the whole 32x32 input


def _transposed_taps(outputs: set[int], n_in: int) -> set[int]:
    """Inputs a 3-tap stride-2 transposed conv (padding 1) reads: output o = 2 i - 1 + j."""
    return {(o + 1 - j) // 2 for o in outputs for j in range(3)
            if (o + 1 - j) % 2 == 0 and 0 <= (o + 1 - j) // 2 < n_in}


def _strided_taps(outputs: set[int], n_in: int) -> set[int]:
    """Inputs a 3-tap stride-2 conv (padding 1) reads: 2 e - 1 + j."""
    return {2 * e - 1 + j for e in outputs for j in range(3) if 0 <= 2 * e - 1 + j < n_in}


def test_transposed_decoder_is_a_checkerboard():
    result = sweep(examples.transposed_decoder(), (1, 3, 32, 32), [[16, w] for w in range(32)])
    boxes = []
    for w in range(32):
        seen = _strided_taps(_strided_taps(_transposed_taps(_transposed_taps({w}, 16), 8), 16), 32)
        boxes.append((min(seen), max(seen)))
    assert list(zip(result.lo[:, 1].tolist(), result.hi[:, 1].tolist(), strict=True)) == boxes
    assert set(result.size[4:28, 1].tolist()) == {7, 11}   # sizes alternate with the output parity


def test_circular_net_wraps_round_the_border():
    result = sweep(examples.circular_net(), (1, 3, 32, 32), "all")
    assert result.padding_modes == ("circular",)
    corner = result.positions.tolist().index([0, 0])
    assert result.wrapped[corner].all() and (result.lo[corner] < 0).all()
    interior = (result.lo >= 0).all(axis=1) & (result.hi < 32).all(axis=1)
    assert not result.wrapped[interior].any() and interior.any()


def test_squeeze_excite_rf_is_global_but_locally_small():
    result = sweep(examples.se_net(), (1, 3, 32, 32), "all")
    assert (result.support == 32 * 32).all()
    local = sweep(examples.se_net(), (1, 3, 32, 32), "center", local=True)
    assert (local.size[0] < 16).all()
