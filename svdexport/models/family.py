"""The contract every DiT family fulfils, and the sampling rule it hands to the run-time loop.

A family is one object (registered in `models.FAMILIES`) that knows one diffusers transformer class: how to
find and load its weights, how to split it into the full-compute and cached-step graphs, which inputs and
sampler its pipeline uses, and how to show its output. Everything above `models/` (runtime, build, bench,
CLI) talks to families only through `Family`, `Sampling` and the graph contract (`GraphContract`: the
graphs' inputs and outputs, declared here once); optional abilities are attributes that are None (or False)
where a family lacks them, never probed with hasattr.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from svdexport.errors import SvdExportError

if TYPE_CHECKING:
    from PIL import Image

    from svdexport.models.weights import WeightsInfo


def axis(default: int, what: str):
    """A shape axis: its default and the help text the CLI shows for its option (`Shapes.axes`)."""
    return field(default=default, metadata={"help": what})


@dataclass
class Shapes:
    """The static shapes of one engine build; families with more axes (video frames) subclass it, each axis
    declared with `axis` so that the CLI offers it with its help text."""

    batch: int = axis(1, "samples per call")
    height: int = axis(512, "height in pixels")
    width: int = axis(512, "width in pixels")
    text_len: int = axis(64, "text tokens")

    pixels_per_token: ClassVar[int] = 16  # pixels per latent token side (VAE factor x patch size)

    def validate(self) -> "Shapes":
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < self.pixels_per_token or v % self.pixels_per_token:
                raise SvdExportError(f"{name}={v} must be a positive multiple of {self.pixels_per_token}")
        if self.batch < 1 or self.text_len < 1:
            raise SvdExportError(f"batch and text_len must be >= 1, got {self.batch} and {self.text_len}")
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def axes(cls) -> dict[str, str]:
        """Axis name -> help text, in declaration order (the CLI's shape options: --text-len for text_len)."""
        return {f.name: f.metadata.get("help", f.name) for f in fields(cls)}

    @classmethod
    def of(cls, family: str, values: dict) -> "Shapes":
        """Shapes from a dict, refusing keys this family has no axis for in one line."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise SvdExportError(f"{family} has no {unknown[0]} shape (its shapes: {', '.join(cls.names())})")
        return cls(**values).validate()

    def to_dict(self) -> dict:
        return {n: getattr(self, n) for n in self.names()}

    @property
    def img_tokens(self) -> int:
        return (self.height // self.pixels_per_token) * (self.width // self.pixels_per_token)


@dataclass(frozen=True)
class RunDefaults:
    """What a model runs when the user says nothing: steps per sample and the uniform step plan."""

    steps: int
    warmup: int
    interval: int


# ---------------------------------------------------------------------------------------- the graph contract
# Both graphs of every family are called with positional tensors in the order `GraphContract` declares, and
# return tensors in the order it declares. The shared inputs below are named and typed alike for every family;
# a family adds its conditioning inputs (`Family.conditioning_inputs`) and orders each graph's inputs
# (`Family.contract`). The scheduler, the build and the pipelines name graph inputs only through these.

MODEL_DTYPE = "model"  # an input in the engine's own precision (the build's --dtype)


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str = MODEL_DTYPE  # or a torch dtype name, for an input whose precision is fixed
    batch_axis: int | None = 0  # the axis whose row k belongs to sample k (None: one tensor for all samples)
    tokens: bool = False  # axis 1 counts the text tokens (Shapes.text_len)

    def torch_dtype(self, model: torch.dtype) -> torch.dtype:
        return model if self.dtype == MODEL_DTYPE else getattr(torch, self.dtype)


# The step and cache inputs every family's graphs take. The cache math runs in float32 (the bases and the
# coefficients: a forecast takes differences of nearly equal values); the residuals are kept in the model's
# dtype, halving the largest cache state (models/mmdit.py measures why that costs nothing).
LATENTS = GraphInput("hidden_states")  # the sampler's latents, in the layout the family's pipeline keeps them
TIMESTEP = GraphInput("timestep")  # Sampling.model_timestep: one value per row
BASES = GraphInput("bases", "float32", None)  # [sites, hidden, k]: one set for every sample
COEFFS = GraphInput("coeffs", "float32", 1)  # [sites, batch, image tokens, k]
RESIDUALS = GraphInput("residuals", MODEL_DTYPE, 1)  # [sites, batch, image tokens, hidden]
SHARED_INPUTS = (LATENTS, TIMESTEP, BASES, COEFFS, RESIDUALS)
NOISE_PRED = "noise_pred"  # the model output, of the latents' shape, in the model's dtype
FULL_OUTPUTS = (NOISE_PRED, COEFFS.name, RESIDUALS.name)  # the full graph's C and R of every cache site
CACHED_OUTPUTS = (NOISE_PRED,)


@dataclass(frozen=True)
class GraphContract:
    """The inputs of a family's two graphs, in call order, and their outputs (FULL_OUTPUTS, CACHED_OUTPUTS).

    Contiguity: every input reaches a compiled graph contiguous (row-major, never a stride-0 broadcast view
    such as `t.expand(B)`), in its declared dtype and on the engine's device: AOTInductor reads the data
    pointer with the exported strides and dtype unchecked (issue 24). export/boundary.py makes every input so
    at every backend's graph, whatever the caller passes; families still hand over such tensors (`check`
    holds a build to it), so that nothing is copied on the hot path."""

    full: tuple[GraphInput, ...]
    cached: tuple[GraphInput, ...]

    def names(self, graph: str) -> list[str]:  # graph: "full" or "cached"
        return [i.name for i in getattr(self, graph)]

    def bind(self, module: nn.Module, graph: str) -> nn.Module:
        """Gives a graph module its `input_names` / `output_names`, refusing a forward whose positional
        parameters are not the contract's, in its order (a family's bug: the call would mix inputs up)."""
        names = self.names(graph)
        params = list(inspect.signature(module.forward).parameters)[: len(names)]
        if params != names:
            raise TypeError(f"{type(module).__name__}.forward takes {params}; the {graph} graph's contract is {names}")
        module.input_names, module.output_names = names, list(FULL_OUTPUTS if graph == "full" else CACHED_OUTPUTS)
        return module

    def check(self, state: dict[str, torch.Tensor], model: torch.dtype) -> None:
        """Refuses graph inputs of another dtype than declared, or not contiguous (a family's bug)."""
        for spec in {i.name: i for i in (*self.full, *self.cached)}.values():
            t, want = state[spec.name], spec.torch_dtype(model)
            if t.dtype != want or not t.is_contiguous():
                raise TypeError(f"graph input {spec.name!r} is {t.dtype}{'' if t.is_contiguous() else ', strided'}; "
                                f"the contract says {want}, contiguous")


@dataclass
class Conditioning:
    """Conditioning rows that replace a family's synthetic ones: per graph input, one row per class (the
    bundled digits models' class table) or per prompt (prompts encoded by the pipeline's text encoders).
    `labels`: the row of each sample (None: rows seed, seed + 1, ... modulo their count)."""

    rows: dict[str, torch.Tensor]
    labels: list[int] | None = None

    def pick(self, seed: int, batch: int) -> dict[str, torch.Tensor]:
        """Each tensor's rows for `batch` samples; wrong labels are the user's one-line error."""
        count = next(iter(self.rows.values())).shape[0]
        labels = [(seed + i) % count for i in range(batch)] if self.labels is None else list(self.labels)
        if len(labels) != batch or not all(0 <= y < count for y in labels):
            raise SvdExportError(f"labels must be {batch} class indices in [0, {count}), got {labels}")
        return {k: v[labels] for k, v in self.rows.items()}


class Sampling(ABC):
    """A family's flow-match sampling rule, one object for the loop, calibration, peers and tests: the
    scheduler, its timesteps for a request, and the timestep the transformer is called with."""

    def __init__(self, config: dict):
        self.config = dict(config)  # diffusers FlowMatchEulerDiscreteScheduler config (stored in the manifest)

    def scheduler(self):
        """A fresh diffusers scheduler of this config."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.config)

    @abstractmethod
    def set_timesteps(self, scheduler, steps: int, shapes: Shapes) -> torch.Tensor:
        """Resets `scheduler` to `steps` timesteps for samples of `shapes`, as the family's pipeline does."""

    @abstractmethod
    def model_timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep t as the pipeline passes it to the transformer: one value per batch row, a
        contiguous tensor (not `t.expand(B)`'s stride-0 view) in the latents' dtype and device."""


class PromptEncoder(ABC):
    """Ability: text encoders in the weights folder (calibration on prompts, `run --prompt`, `apply`)."""

    pipeline_class: ClassVar[str]  # the diffusers pipeline class name that owns the encoders
    default_guidance: ClassVar[float]  # the pipeline's guidance_scale when the user gives none
    # CFG in one call: the pipeline joins its uncond and cond rows in one transformer call (SD3); an engine that
    # serves half that batch runs the halves as two passes, each with its own cache state ("uncond", "cond").
    batched_cfg: ClassVar[bool] = False

    @abstractmethod
    def available(self, info: "WeightsInfo") -> bool:
        """Whether this weights folder holds the encoders and tokenizers."""

    @abstractmethod
    def encode(self, info: "WeightsInfo", prompts: list[str], text_len: int, dtype: torch.dtype,
               device: str) -> dict[str, torch.Tensor]:
        """Per prompt, the conditioning tensors the transformer takes (stacked rows)."""

    @abstractmethod
    def call_inputs(self, config: dict, kwargs: dict, memo: dict) -> dict[str, torch.Tensor]:
        """Graph inputs from the keyword arguments the pipeline passes its transformer (`memo` persists
        across the steps of one call)."""

    @abstractmethod
    def generate(self, pipe, prompts: list[str], shapes: Shapes, steps: int, guidance_scale: float,
                 generator: torch.Generator) -> list:
        """Calls the pipeline on `prompts` at the build shapes: per prompt a PIL image, or a video's PIL frames
        (families with `is_video`)."""


class Family(ABC):
    """One DiT family. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]  # registry key and manifest value, e.g. "flux"
    class_name: ClassVar[str]  # the diffusers transformer class
    shapes_type: ClassVar[type[Shapes]] = Shapes  # build-shape dataclass
    default_weights: ClassVar[str]  # what --weights means when not given ("bundled:NAME")
    bundled: ClassVar[dict] = {}  # bundled:NAME -> what the package ships for it (listed by --help)
    pipeline_parts: ClassVar[tuple[str, ...]] = ()  # pipeline folders recorded beside the transformer
    prompts: PromptEncoder | None = None  # ability: text encoders (None: synthetic or class conditioning)
    is_video: ClassVar[bool] = False  # ability: outputs are videos (`video_frames`)
    peer_libraries: ClassVar[tuple[str, ...]] = ()  # peers of bench.peers known to run on this family
    peer_refusals: ClassVar[dict[str, str]] = {}  # "PEER MODE" (e.g. "diffusers-taylorseer lite") -> why not here
    # The family's own graph inputs (text embeddings, masks, position tables, guidance): every one its graphs
    # may take, with dtype and batch axis; `contract` orders them with the shared ones for each graph.
    conditioning_inputs: ClassVar[tuple[GraphInput, ...]] = ()
    # Ability: the diffusers LoRA loader mixin of the family's pipeline (its Kohya/BFL conversions included),
    # by name; None: LoRAs are refused for this family.
    lora_loader: ClassVar[str | None] = None

    # ------------------------------------------------------------------ weights
    @abstractmethod
    def inspect(self, weights: str | None) -> "WeightsInfo":
        """What the weights are (config, files, pipeline parts, conditioning) without loading a tensor."""

    @abstractmethod
    def load(self, info: "WeightsInfo", dtype: torch.dtype) -> nn.Module:
        """The real diffusers transformer in eval mode, without gradients."""

    @abstractmethod
    def parameters(self, config: dict) -> int:
        """Parameter count of the transformer a config describes (nothing allocated)."""

    @abstractmethod
    def activation_bytes(self, config: dict, shapes: Shapes, itemsize: int) -> int:
        """Largest activations of one full step, for the build's memory estimate."""

    @abstractmethod
    def default_shapes(self, info: "WeightsInfo") -> Shapes:
        """The build shapes for these weights when the user gives none."""

    # ------------------------------------------------------------------ graphs
    @abstractmethod
    def hidden_size(self, config: dict) -> int:
        """Width D of the cached features."""

    @abstractmethod
    def sites(self, config: dict, granularity: str) -> list[str]:
        """Cache-site names, in the order the graphs stack them."""

    def peer_probe(self, transformer: nn.Module) -> nn.Module:
        """A module run inside the last block's attention only when it computes (peers count full steps by
        it); families with `peer_libraries` override this."""
        raise SvdExportError(f"no peer library runs on {self.name} models")

    @abstractmethod
    def contract(self, config: dict, granularity: str) -> GraphContract:
        """Both graphs' inputs for this config and granularity, in call order (`declare` makes it)."""

    def declare(self, full: list[str], cached: list[str]) -> GraphContract:
        """A contract from input names, each a shared input or one of `conditioning_inputs`."""
        known = {i.name: i for i in (*SHARED_INPUTS, *self.conditioning_inputs)}
        unknown = [n for n in (*full, *cached) if n not in known]
        if unknown:
            raise TypeError(f"{self.name} declares no graph input {unknown[0]!r}")
        return GraphContract(tuple(known[n] for n in full), tuple(known[n] for n in cached))

    @property
    def batched(self) -> tuple[str, ...]:
        """Inputs with a leading batch axis: joined to batch samples, padded to an engine's batch."""
        return tuple(i.name for i in (LATENTS, TIMESTEP, *self.conditioning_inputs) if i.batch_axis == 0)

    @property
    def text_input(self) -> str | None:
        """The conditioning input whose axis 1 counts the text tokens (None: the family has none)."""
        return next((i.name for i in self.conditioning_inputs if i.tokens), None)

    @abstractmethod
    def graphs(self, transformer: nn.Module, granularity: str) -> tuple[nn.Module, nn.Module]:
        """(full-compute graph, cached-step graph), each bound to `contract` (`GraphContract.bind`). The full
        graph keeps the unmodified transformer as `.transformer` (peers and eager references run it)."""

    # ------------------------------------------------------------------ sampling
    @abstractmethod
    def sampler_config(self, weights: str | None, config: dict) -> dict:
        """The scheduler config: the weights folder's own, else the family's default for this config."""

    @abstractmethod
    def sampling(self, sampler_config: dict) -> Sampling:
        """The sampling rule over a scheduler config."""

    @abstractmethod
    def run_defaults(self, config: dict, sampler_config: dict) -> RunDefaults:
        """Steps, warmup and interval when the user gives none."""

    @abstractmethod
    def example_inputs(self, config: dict, shapes: Shapes, seed: int, dtype: torch.dtype = torch.float32,
                       conditioning: Conditioning | None = None) -> dict[str, torch.Tensor]:
        """Seeded noise latents and conditioning (`conditioning`'s rows when given, else synthetic), as the
        contract types them; also whatever `forward_kwargs` needs besides (FLUX's position ids)."""

    @abstractmethod
    def forward_kwargs(self, inputs: dict[str, torch.Tensor], timestep: torch.Tensor) -> dict:
        """Keyword arguments of the unmodified transformer's forward, as the family's pipeline calls it."""

    # ------------------------------------------------------------------ outputs
    @abstractmethod
    def unpack(self, latents: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        """Final latents as images [B, C, H, W] (or videos [B, C, F, H, W]), float32."""

    @abstractmethod
    def preview(self, latents: torch.Tensor, shapes: Shapes) -> "Image.Image":
        """One PNG-able picture of a batch of latents."""

    def video_frames(self, latents: torch.Tensor, shapes: Shapes) -> list[list["Image.Image"]]:
        """Per video its frames (families with `is_video`)."""
        raise SvdExportError(f"{self.name} models make images, not videos")

    def shapes(self, values: dict) -> Shapes:
        return self.shapes_type.of(self.name, values)
