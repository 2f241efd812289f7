"""Constants a compiler derives from the weights, rebuilt at load from the bound weights (issue 27).

With freezing, Inductor folds the weights' preparation into new constants of the package: oneDNN's prepacked
bf16 weights (`mkldnn._reorder_linear_weight`), PT2E's prepacked int8 weights (`onednn.qlinear_prepack`),
transposes. Those are opaque oneDNN tensors that no file format stores, and copies of the weights besides.
Instead of keeping them, a build records how each was made (`capture`, around the compile: the ops that
freezing's constant folding ran, back to the program's own constants) as a small JSON recipe; a load binds
the program's constants as it always does (views of the checkpoint, or of the engine's constants file for
tensors the checkpoint lacks, such as PT2E's int8 weights) and replays each recipe once (`replay`): the
packed copy is made in memory at load, and the checkpoint stays mapped, never copied into the engine.

Derived constants with no recipe (Inductor's own small casts, such as PT2E's int32 zero points) are kept as
tensors (`Captured.unrecipted`), for the engine's constants file. A package's constants are bound by their
internal names (`constant_names`): a load by FQN cannot tell apart two derived constants of one FQN.
"""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svdexport.errors import SvdExportError

# Ops a recipe may replay (an engine's file names them; nothing else is called at load).
REPLAYABLE = {"aten.permute.default", "aten.t.default", "aten.clone.default", "aten.contiguous.default",
              "aten._to_copy.default", "aten.view.default", "aten.reshape.default", "aten.transpose.int",
              "aten.mul.Tensor", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.expand.default",
              "prims.convert_element_type.default",
              "mkldnn._reorder_linear_weight", "mkldnn._reorder_convolution_weight", "onednn.qlinear_prepack",
              "onednn.qconv_prepack"}  # _reorder_convolution_weight: HunyuanVideo's Conv3d patch embedder (fp32)


def _op_name(target) -> str:
    """"namespace.op.overload" of an OpOverload, "namespace.op" of a packet (freezing's passes call some so)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        namespace, _, op = target._qualified_op_name.partition("::")
        return f"{namespace}.{op}"
    return str(target)


def _op(name: str):
    if name not in REPLAYABLE:
        raise SvdExportError(f"the engine's recipe of a derived constant calls {name}, which svdexport does not "
                             "replay: rebuild the engine with this svdexport")
    namespace, opname, *overload = name.split(".")
    packet = getattr(getattr(torch.ops, namespace), opname)
    return getattr(packet, overload[0]) if overload else packet


@dataclass
class Captured:
    """What a compile derived: per internal constant name, its recipe (steps of [op, args, kwargs], with
    {"fqn": name} for a program constant and {"step": i} for an earlier step's result), or the tensor itself."""

    recipes: dict[str, list] = field(default_factory=dict)
    unrecipted: dict[str, torch.Tensor] = field(default_factory=dict)


def _encode(value, tensor_ref):
    if isinstance(value, torch.Tensor):
        return tensor_ref(value)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (torch.layout, torch.device, torch.memory_format)):
        return {"torch": str(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensor_ref) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v, tensor_ref) for k, v in value.items()}
    return value


def _decode(value, tensors: dict, steps: list):
    if isinstance(value, dict):
        if "fqn" in value:
            return tensors[value["fqn"]]
        if "step" in value:
            return steps[value["step"]]
        if "dtype" in value:
            return getattr(torch, value["dtype"])
        if "torch" in value:
            return eval(value["torch"], {"torch": torch})  # noqa: S307 (only torch.<layout|device|format>)
        return {k: _decode(v, tensors, steps) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, steps) for v in value]
    return value


@contextlib.contextmanager
def capture(program_constants: dict[str, torch.Tensor]):
    """Records, during a compile of a program whose constants are `program_constants` (FQN -> tensor), the
    constants Inductor adds and how freezing's constant folding made each; yields the `Captured`."""
    from torch._inductor.constant_folding import ConstantFolder
    from torch._inductor.graph import GraphLowering

    made: dict[int, tuple] = {}  # id(result) -> (op, args, kwargs, the tensors they hold): kept alive
    added: dict[str, torch.Tensor] = {}
    run_node, add_constant = ConstantFolder.run_node, GraphLowering.add_tensor_constant

    def folding(self, node):
        out = run_node(self, node)
        if node.op == "call_function" and isinstance(out, torch.Tensor):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            made[id(out)] = (node.target, args, kwargs, out)
        return out

    def adding(self, data, name=None):
        out = add_constant(self, data, name)
        added[out.get_name()] = data
        return out

    ConstantFolder.run_node, GraphLowering.add_tensor_constant = folding, adding
    result = Captured()
    try:
        yield result
    finally:
        ConstantFolder.run_node, GraphLowering.add_tensor_constant = run_node, add_constant
    program = {(t.data_ptr(), tuple(t.shape), t.dtype): k for k, t in program_constants.items()
               if isinstance(t, torch.Tensor) and t.layout == torch.strided}
    for name, tensor in added.items():
        if tensor.layout == torch.strided and (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) in program:
            continue  # a program constant: bound by its FQN
        steps: list = []
        if id(tensor) in made and _recipe(id(tensor), made, program, steps, {}) is not None:
            result.recipes[name] = steps
        else:
            result.unrecipted[name] = tensor


def _recipe(key: int, made: dict, program: dict, steps: list, memo: dict) -> int | None:
    """Appends to `steps` the ops that made tensor `key` from program constants; its step index, or None
    where an input is neither a program constant nor a folded result, or an op is not replayable."""
    if key in memo:
        return memo[key]
    target, args, kwargs, _ = made[key]
    if _op_name(target) not in REPLAYABLE:
        return None
    failed = []

    def ref(t: torch.Tensor):
        if id(t) in made:
            i = _recipe(id(t), made, program, steps, memo)
            if i is not None:
                return {"step": i}
        elif t.layout == torch.strided and (t.data_ptr(), tuple(t.shape), t.dtype) in program:
            return {"fqn": program[(t.data_ptr(), tuple(t.shape), t.dtype)]}
        failed.append(tuple(t.shape))
        return None

    entry = [_op_name(target), _encode(list(args), ref), _encode(dict(kwargs), ref)]
    if failed:
        return None
    steps.append(entry)
    memo[key] = len(steps) - 1
    return memo[key]


@torch.no_grad()
def replay(recipes: dict[str, list], constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each derived constant, made again from the bound program `constants` (FQN -> tensor)."""
    out = {}
    for name, recipe in recipes.items():
        steps: list = []
        try:
            for op, args, kwargs in recipe:
                steps.append(_op(op)(*_decode(args, constants, steps), **_decode(kwargs, constants, steps)))
        except KeyError as e:
            raise SvdExportError(f"the engine's recipe of {name} needs the weight {e.args[0]}, which it does not "
                                 "bind: rebuild the engine") from None
        out[name] = steps[-1]
    return out


def constant_names(package: Path, folder: Path) -> dict[str, str]:
    """A package's constants, internal name -> original FQN (extracted into `folder`, which the caller owns)."""
    with zipfile.ZipFile(package) as z:
        so = [n for n in z.namelist() if n.endswith(".so")]
        z.extractall(folder, members=so)
    if len(so) != 1:
        raise SvdExportError(f"{package} holds {len(so)} compiled models; svdexport makes one per package")
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(folder / so[0]), 1)
    return dict(runner.get_constant_names_to_original_fqns())


def bind_by_name(package, names: dict[str, str], constants: dict[str, torch.Tensor],
                 derived: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Binds every constant of a loaded package (user-managed: no copy) by internal name: derived ones from
    `derived` (replayed recipes and kept tensors), the others from the program's `constants` by FQN."""
    values = {}
    for name, fqn in names.items():
        value = derived.get(name, constants.get(fqn))
        if value is None:
            raise SvdExportError(f"the engine binds nothing to {name} ({fqn}) of its package: rebuild it")
        values[name] = value
    package.loader.update_constant_buffer(values, False, True, True)
    return values  # the package reads this memory: keep it as long as the package
