"""The package's layers depend one way, without a circle, and the family contract is declared, not probed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import svdexport
from svdexport.models import FAMILIES
from svdexport.models.family import Family, Sampling

ROOT = Path(svdexport.__file__).parent
# Lowest first; a module may import its own layer and the ones below, never one above.
LAYERS = [("errors", "files", "hardware", "media", "outputs", "progress", "quiet", "tensorfile", "verified", "version"),
          ("cache",), ("export",), ("models",), ("runtime",), ("builder",), ("bench", "batch", "__init__"), ("cli",)]
MODULES = sorted(ROOT.rglob("*.py"))


def module_name(path: Path) -> str:
    """svdexport.runtime.engine for runtime/engine.py; a package's __init__.py is the package (svdexport for the
    top one)."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {module_name(p) for p in MODULES}


def layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("svdexport.") else "__init__"  # bare svdexport: its __init__
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module} is in no layer: add {top!r} to LAYERS"
    return found[0]


def imports(path: Path) -> set[str]:
    """The svdexport modules `path` imports, anywhere in it (inside functions too: a lazy import still runs
    and still ties the modules), except under `if TYPE_CHECKING:` (never run: annotations only).
    `from svdexport.x import y` names the module svdexport.x.y where y is one, else svdexport.x."""
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for rest in child.orelse:
                    visit(rest)
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "svdexport":
                found.update(f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in NAMES else child.module
                             for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "svdexport")
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_no_import_runs_up_the_layers(path):
    name = module_name(path)
    own = layer(name)
    up = sorted(m for m in imports(path) if layer(m) > own)  # the bare package (its __init__) is the top layer
    assert not up, f"{name} (layer {own}) imports {up} from above"


def test_no_import_cycle():
    """No circle among svdexport's modules, counting every import but type-checking ones (lazy imports too)."""
    graph = {module_name(p): {m for m in imports(p) if m in NAMES} - {module_name(p)} for p in MODULES}
    done: set[str] = set()

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[start]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (found := cycle_from(nxt, path + [nxt])) is not None:
                return found
        done.add(start)
        return None

    for name in sorted(graph):
        if name not in done and (found := cycle_from(name, [name])) is not None:
            pytest.fail("import cycle: " + " -> ".join(found))


def test_importing_the_package_loads_nothing_heavy():
    """`import svdexport` (what every entry point does first) pulls in no torch, diffusers or numpy."""
    code = ("import sys, svdexport; heavy = sorted({'torch', 'diffusers', 'numpy', 'transformers'} & set(sys.modules));"
            "print(svdexport.__version__, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == svdexport.__version__ and out[1:] == ["[]"], out


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
