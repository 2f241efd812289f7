"""Where each constant of a compiled graph comes from: bytes of the user's checkpoint, or the engine's own file.

An engine built from a local checkpoint does not copy the transformer's weights. At build, every constant of
an exported graph (parameter, buffer, lifted tensor) that is a view of a mapped checkpoint file (or was cast
from one) is recorded as a byte range of that file (`Located`); the rest (generated weights, tensors that a
layout conversion had to concatenate, small lifted constants) is written into the engine's `constants` file.
At load the checkpoint is mapped again and each graph gets its constants as views of the mapping (cast where
the graph's dtype differs from the file's), which the backend binds to its compiled graph without a copy.

Names: a graph's constants are named by their FQN in that graph, as torch.export, AOTInductor's constant
buffers and the ONNX initializers name them; the engine's file stores each embedded tensor once, under the
transformer's own name where it has one (the full and cached graphs share the output head).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from svdexport.errors import SvdExportError
from svdexport.tensorfile import DTYPES, Located, MappedFile


@dataclass
class Bindings:
    """Per graph, per constant FQN: its location in a referenced file, or its key in the engine's own file;
    and the dtype the graph takes it in."""

    located: dict[str, dict[str, Located]] = field(default_factory=dict)
    embedded: dict[str, dict[str, str]] = field(default_factory=dict)  # graph -> fqn -> key in the engine file
    dtypes: dict[str, dict[str, str]] = field(default_factory=dict)  # graph -> fqn -> the graph's dtype

    def to_dict(self) -> dict:
        return {"located": {g: {k: [v.file, v.offset, v.dtype, v.shape] for k, v in d.items()}
                            for g, d in self.located.items()},
                "embedded": self.embedded, "dtypes": self.dtypes}

    @classmethod
    def from_dict(cls, data: dict) -> "Bindings":
        try:
            located = {g: {k: Located(int(f), int(o), str(dt), [int(s) for s in sh]) for k, (f, o, dt, sh) in d.items()}
                       for g, d in data["located"].items()}
            out = cls(located, {g: dict(d) for g, d in data["embedded"].items()},
                      {g: dict(d) for g, d in data["dtypes"].items()})
            for g, d in out.dtypes.items():
                for fqn, dt in d.items():
                    getattr(torch, dt)
            return out
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SvdExportError(f"the engine's weight bindings are malformed ({type(e).__name__}: {str(e)[:120]})") \
                from None

    def referenced_bytes(self) -> int:
        seen = {(v.file, v.offset) : v for d in self.located.values() for v in d.values()}
        return sum(_nbytes(v.shape, DTYPES[v.dtype]) for v in seen.values())


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def graph_constants(program) -> dict[str, torch.Tensor]:
    """Every constant an exported program holds, by FQN: parameters, buffers and lifted tensor constants."""
    return {**program.state_dict, **program.constants}


def bind(constants: dict[str, dict[str, torch.Tensor]], names: dict[int, str], origins: dict[str, Located],
         embed_all: bool = False) -> tuple[Bindings, dict[str, torch.Tensor]]:
    """Bindings of each graph's constants (graph -> FQN -> tensor) and the tensors the engine keeps itself.

    `names`: by the identity of a tensor, its name in the transformer (the graphs share the transformer's
    tensors); `origins`: by that name, where its bytes are in a referenced file (loaded as a view of the
    mapping, or cast from one). A tensor without an origin is kept in the engine's file, once, under its
    transformer name where it has one. `embed_all`: keep every tensor (a self-contained engine)."""
    out, embedded = Bindings(), {}
    for graph, tensors in constants.items():
        out.located[graph], out.embedded[graph], out.dtypes[graph] = {}, {}, {}
        for fqn, t in tensors.items():
            out.dtypes[graph][fqn] = str(t.dtype).removeprefix("torch.")
            name = names.get(id(t))
            where = None if embed_all or name is None else origins.get(name)
            if where is not None:
                out.located[graph][fqn] = where
                continue
            key = name or f"{graph}.{fqn}"
            embedded[key] = t.detach()
            out.embedded[graph][fqn] = key
    return out, embedded


def resolve(bindings: Bindings, graph: str, files: list[MappedFile], own: dict[str, torch.Tensor],
            cache: dict | None = None) -> dict[str, torch.Tensor]:
    """A graph's constants by FQN: views of the mapped referenced `files` and the engine's `own` tensors, each
    in the dtype the graph takes (a cast, once per tensor across graphs through `cache`)."""
    cache = {} if cache is None else cache
    out = {}
    for fqn, where in bindings.located.get(graph, {}).items():
        want = getattr(torch, bindings.dtypes[graph][fqn])
        key = ("file", where.file, where.offset, want)
        if key not in cache:
            if not 0 <= where.file < len(files):
                raise SvdExportError(f"the engine binds {fqn} to weight file {where.file}, which it does not list")
            t = files[where.file].view(where.offset, DTYPES[where.dtype], tuple(where.shape))
            cache[key] = t if t.dtype == want else t.to(want)
        out[fqn] = cache[key]
    for fqn, name in bindings.embedded.get(graph, {}).items():
        if name not in own:
            raise SvdExportError(f"the engine's constants file has no tensor {name!r} (for {fqn}): rebuild the engine")
        want = getattr(torch, bindings.dtypes[graph][fqn])
        key = ("own", name, want)
        if key not in cache:
            cache[key] = own[name] if own[name].dtype == want else own[name].to(want)
        out[fqn] = cache[key]
    return out
