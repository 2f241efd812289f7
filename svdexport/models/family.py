"""The contract every DiT family fulfils, and the sampling rule it hands to the run-time loop.

A family is one object (registered in `models.FAMILIES`) that knows one diffusers transformer class: how to
find and load its weights, how to split it into the full-compute and cached-step graphs, which inputs and
sampler its pipeline uses, and how to show its output. Everything above `models/` (runtime, build, bench,
CLI) talks to families only through `Family` and `Sampling`; optional abilities are attributes that are
None (or False) where a family lacks them, never probed with hasattr.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from svdexport.errors import SvdExportError

if TYPE_CHECKING:
    from PIL import Image

    from svdexport.models.weights import WeightsInfo


@dataclass
class Shapes:
    """The static shapes of one engine build; families with more axes (video frames) subclass it."""

    batch: int = 1  # samples per call
    height: int = 512  # pixels
    width: int = 512  # pixels
    text_len: int = 64  # text tokens

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
    batched: ClassVar[tuple[str, ...]]  # graph inputs with a leading batch axis (padded to the engine's batch)
    default_guidance: ClassVar[float]  # the pipeline's guidance_scale when the user gives none

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

    @abstractmethod
    def graphs(self, transformer: nn.Module, granularity: str) -> tuple[nn.Module, nn.Module]:
        """(full-compute graph, cached-step graph): positional tensors, `input_names` / `output_names`.

        The input contract, which every backend's loaded graphs keep: the inputs are called positionally in
        `input_names` order, batched ones with a leading batch axis (coeffs and residuals: cache sites, then
        batch; bases: none), row k belonging to sample k in every one. At the compiled-graph
        boundary (export/boundary.py) each is made contiguous, in the dtype the graph was exported with (the
        manifest's GraphSpec.input_dtypes) and on the engine's device, whatever the caller passes; a family
        should still hand over such tensors (`Sampling.model_timestep` does), so that nothing is copied."""

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
                       table: dict | None = None, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Seeded noise latents and conditioning (rows of `table` when given, else synthetic)."""

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
