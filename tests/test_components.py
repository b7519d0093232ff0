"""The component registry: build / save / load round trips, config checking, export, and the
rule that nothing outside the registry branches on a family's name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import difflab
from difflab import cli
from difflab.components import families, family_of, get_family
from difflab.errors import DifflabError

PACKAGE = Path(difflab.__file__).resolve().parent


@pytest.mark.parametrize("family, values", [
    ("unet", {"preset": "tiny", "image_size": 8, "in_channels": 1, "out_channels": 1,
              "num_classes": 3}),
    ("classifier", {"preset": "tiny", "image_size": 8, "in_channels": 1, "num_classes": 4}),
    ("alignment", {"preset": "tiny", "image_size": 8, "in_channels": 3, "text_dim": 6}),
])
def test_save_then_load_rebuilds_the_same_network(family, values, tmp_path):
    torch.manual_seed(0)
    net = difflab.build(family, **values)
    fam, config = family_of(net)
    assert fam.name == family
    out = difflab.save(net, tmp_path / family, metadata={"note": "x"})
    meta = json.loads((out / "config.json").read_text())
    assert (meta["family"], meta["version"], meta["metadata"]) == (family, fam.version,
                                                                  {"note": "x"})
    torch.manual_seed(1)  # a different init: the weights must come from the file
    back = difflab.load(out)
    assert family_of(back)[1] == config
    a, b = net.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # re-saving over a component folder replaces it atomically
    difflab.save(back, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [family]


def test_build_errors_name_the_key_and_the_family():
    with pytest.raises(DifflabError) as info:
        difflab.build("unet", preset="tiny", model_chanels=4, num_res_blocks="x")
    msg = str(info.value)
    assert "unet.model_chanels: unknown key (did you mean 'model_channels'?)" in msg
    assert "unet.num_res_blocks='x'" in msg and "family 'unet'" in msg
    with pytest.raises(DifflabError, match="unet.dropout=1.5.*family 'unet'"):
        difflab.build("unet", preset="tiny", dropout=1.5)
    with pytest.raises(DifflabError, match="not a registered family.*unet"):
        difflab.build("resnet")
    with pytest.raises(DifflabError, match="is a classifier, not denoiser"):
        get_family("classifier", ("denoiser",))
    with pytest.raises(DifflabError, match="preset='huge' is not a preset"):
        difflab.build("unet", preset="huge")


def test_load_refuses_what_is_not_a_component(tmp_path):
    with pytest.raises(DifflabError, match="config.json is missing"):
        difflab.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DifflabError, match="not a difflab component"):
        difflab.load(tmp_path)
    (tmp_path / "junk").write_text("x")
    net = difflab.build("unet", preset="tiny", image_size=8, in_channels=1, out_channels=1)
    with pytest.raises(DifflabError, match="not a component folder"):
        difflab.save(net, tmp_path / "..", metadata={})


def test_every_builtin_family_is_registered_with_its_dataclass():
    fams = families()
    assert {"unet", "classifier", "alignment", "text_encoder"} <= set(fams)
    for fam in fams.values():
        if fam.presets:
            assert all(isinstance(p, fam.config) for p in fam.presets.values())


def test_export_writes_a_component_that_samples_like_the_run(tmp_path):
    legacy = Path(__file__).resolve().parent / "fixtures" / "legacy" / "unet"
    assert cli.main(["export", str(legacy), str(tmp_path / "exported")]) == 0
    net = difflab.load(tmp_path / "exported")
    run = difflab.load_run(legacy)
    a, b = net.state_dict(), run.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    req = dict(sampler="ddim", steps=3, n=4, seed=1, labels=[2], guidance="cfg:2")
    x = difflab.generate(difflab.SampleRequest(run, **req)).images
    y = difflab.generate(difflab.SampleRequest(str(tmp_path / "exported"), **req)).images
    assert torch.equal(x, y)


def _compares_family_names(tree: ast.AST, names: set[str]) -> list[int]:
    """Line numbers of ``==`` / ``!=`` / ``in`` comparisons against a family-name literal or of
    an ``.arch`` attribute."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        parts = [node.left, *node.comparators]
        literal = any(isinstance(p, ast.Constant) and p.value in names for p in parts) or any(
            isinstance(p, (ast.Tuple, ast.List, ast.Set)) and any(
                isinstance(e, ast.Constant) and e.value in names for e in p.elts)
            for p in parts)
        arch = any(isinstance(p, ast.Attribute) and p.attr == "arch" for p in parts)
        if literal or arch:
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_registry_compares_architecture_names():
    names = set(families())
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "components.py":
            continue
        for line in _compares_family_names(ast.parse(f.read_text()), names):
            offenders.append(f"{f.relative_to(PACKAGE)}:{line}")
    assert offenders == []
    # the scan finds what it looks for
    assert _compares_family_names(ast.parse("if cfg.model.arch == 'x': pass"), names) == [1]
    assert _compares_family_names(ast.parse("if a in ('unet', 'b'): pass"), names) == [1]
