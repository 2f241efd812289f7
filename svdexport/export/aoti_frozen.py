"""AOTInductor packages compiled with freezing: the quantized aoti engines (`build --quantize int8`, issue 27).

A PT2E int8 graph compiles to oneDNN's qlinear only under Inductor's freezing, which folds the int8 weights
into prepacked (oneDNN-blocked) constants that no file format stores. The build records how freezing made
each such constant (export/derived.py: a JSON recipe of allow-listed ops back to the program's constants) and
keeps the few derived tensors that have no recipe; the load binds the program's constants as every aoti
engine does (bindings: the checkpoint's bytes or the engine's constants file, where the int8 weights and
their scales are) and makes the derived ones again from them. Every file named here is in the engine folder,
listed and hashed by the manifest, and opened through it.

Engine files per graph: NAME.aoti.pt2 (the package, no constants), NAME.derived.json (recipes),
NAME.derived.safetensors (derived tensors without a recipe).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from svdexport import tensorfile
from svdexport.errors import SvdExportError, first_line
from svdexport.export import GRAPHS, GraphExport, LoadSpec
from svdexport.export import derived
from svdexport.export.bindings import graph_constants
from svdexport.export.gemm_path import gemm_paths, package_code
from svdexport.export.quantize import QuantScheme, inductor_configs
from svdexport.files import Scratch, read_json
from svdexport.progress import phase
from svdexport.quiet import quiet

RECIPES = "{}.derived.json"
TENSORS = "{}.derived.safetensors"


def compile_frozen(graphs: dict[str, GraphExport], engine_dir: Path, scheme: QuantScheme) -> dict:
    """Both graphs compiled with freezing (`quantize.inductor_configs`) under no_grad, their derived constants
    recorded; returns the backend record (packages, recipes, derived tensors, the scheme, the GEMM path)."""
    from torch._inductor import aoti_compile_and_package

    record: dict = {"packages": {}, "derived": {}, "derived_tensors": {}}
    for name in GRAPHS:
        package = engine_dir / f"{name}.aoti.pt2"
        program = graphs[name].program
        try:
            with phase(f"compiling the {name} graph (AOTInductor, {scheme.name}, freezing)"), quiet(), \
                    torch.no_grad(), derived.capture(graph_constants(program)) as made:
                aoti_compile_and_package(program, package_path=str(package), inductor_configs=inductor_configs(scheme))
        except SvdExportError:
            raise
        except Exception as e:
            raise SvdExportError(f"AOTInductor failed on the {name} {scheme.name} graph: "
                                 f"{first_line(e)}") from e
        opaque = [k for k, t in made.unrecipted.items() if t.layout != torch.strided]
        if opaque:  # nothing could rebuild it at load, and no file format stores it
            raise SvdExportError(f"freezing made a {made.unrecipted[opaque[0]].layout} constant {opaque[0]} of the "
                                 f"{name} graph without a recipe: this torch cannot build a {scheme.name} aoti engine")
        (engine_dir / RECIPES.format(name)).write_text(json.dumps(made.recipes, sort_keys=True) + "\n")
        tensorfile.write(engine_dir / TENSORS.format(name), {k: t.contiguous() for k, t in made.unrecipted.items()},
                         {"format": "svdexport.derived"})
        record["packages"][name] = package.name
        record["derived"][name] = RECIPES.format(name)
        record["derived_tensors"][name] = TENSORS.format(name)
    record["quantization"] = scheme.to_dict()
    record["gemm_path"] = gemm_paths(package_code(engine_dir / record["packages"]["full"]))
    return record


def bind_frozen(package, name: str, spec: LoadSpec, engine_dir: Path, path: Path, scratch: Scratch) -> None:
    """Binds every constant of a frozen package by its internal name: the program's constants from the
    engine's bindings (no copy), the derived ones replayed from their recipes or read from the engine's file."""
    recipes_path = spec.file("derived", name, engine_dir)
    recipes = read_json(recipes_path, f"the engine's derived-constant recipes {recipes_path}")
    if not isinstance(recipes, dict) or not all(isinstance(r, list) for r in recipes.values()):
        raise SvdExportError(f"the engine's derived-constant recipes {recipes_path} are malformed")
    kept_file = tensorfile.MappedFile(spec.file("derived_tensors", name, engine_dir))
    kept = kept_file.tensors()
    constants = spec.constants(name) if spec.constants is not None else {}
    try:
        made = {**derived.replay(recipes, constants), **kept}
    except SvdExportError:
        raise
    except Exception as e:  # a recipe whose arguments do not fit its op: the file was written so
        raise SvdExportError(f"the engine's derived constants of its {name} graph cannot be made again "
                             f"({type(e).__name__}: {first_line(e)[:120]}): rebuild it") from None
    folder = scratch.path / f"{name}.names"
    folder.mkdir(parents=True, exist_ok=True)
    names = derived.constant_names(path, folder)
    package.svdexport_constants = derived.bind_by_name(package, names, constants, made)
    package.svdexport_mapped = kept_file  # the derived tensors view its mapping: it lives as long


def quantization(options: dict) -> QuantScheme | None:
    """The scheme an aoti engine's backend record holds (None: not quantized; engines from before issue 27)."""
    return QuantScheme.from_dict(options.get("quantization"))
