"""The package's layers depend one way, and the family contract is declared, not probed."""

import ast
from pathlib import Path

import pytest

import svdexport
from svdexport.models import FAMILIES
from svdexport.models.family import Family, Sampling

ROOT = Path(svdexport.__file__).parent
# Lowest first; a module may import its own layer and the ones below, never one above.
LAYERS = [("errors", "files", "hardware", "media", "outputs", "quiet", "tensorfile", "verified"), ("cache",), ("export",), ("models",),
          ("runtime",), ("builder",), ("bench", "batch", "cli", "commands", "options", "__init__")]


def layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("svdexport.") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("svdexport"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("svdexport")}
    return found


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_import_runs_up_the_layers(path):
    name = "svdexport." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    name = name.removesuffix(".__init__") if path.name == "__init__.py" and path.parent != ROOT else name
    own = layer(name)
    up = sorted(m for m in imports(path) if m != "svdexport" and layer(m) > own)
    assert not up, f"{name} (layer {own}) imports {up} from above"


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long


def test_no_hasattr_probe_on_a_family():
    offenders = [str(p.relative_to(ROOT)) for p in MODULES if "hasattr(engine.family" in p.read_text()
                 or "hasattr(fam" in p.read_text() or "hasattr(family" in p.read_text()]
    assert not offenders


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_registered_family_fulfils_the_contract(name):
    fam = FAMILIES[name]
    assert isinstance(fam, Family) and fam.name == name
    assert not getattr(type(fam), "__abstractmethods__", None)  # every abstract method implemented
    info = fam.inspect(None)  # the family's default (bundled) weights, no tensor loaded
    shapes = fam.default_shapes(info)
    sampling = fam.sampling(fam.sampler_config(None, info.config))
    assert isinstance(sampling, Sampling)
    timesteps = sampling.set_timesteps(sampling.scheduler(), 10, shapes)
    assert len(timesteps) == 10 and bool((timesteps[:-1] > timesteps[1:]).all())  # descending noise levels
    defaults = fam.run_defaults(info.config, sampling.config)
    assert defaults.steps >= 1 and defaults.interval >= 1
    assert fam.sites(info.config, "final") == ["final"]
    assert fam.prompts is None or fam.prompts.pipeline_class
    assert set(fam.peer_libraries) <= set(__import__("svdexport.bench.peers", fromlist=["PEERS"]).PEERS)


def test_shapes_refuse_an_axis_the_family_lacks():
    from svdexport.errors import SvdExportError

    with pytest.raises(SvdExportError, match="flux has no frames shape"):
        FAMILIES["flux"].shapes({"frames": 9})
