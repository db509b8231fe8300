"""The registry of initialisations: each method is defined once, by one `register_init` call.

The run config's choices, the CLI's help, the stage loop's data preparation (which gradient batches to build),
whether a stage's factors are absorbed into the base weight, and the run folder's init records all derive from the
registered `InitMethod`, so a new method needs no edit anywhere else:

    def my_factors(layer: LayerInput, config: InitConfig) -> Factors:
        a = torch.randn(layer.rank, layer.weight.shape[1]) * 1e-3
        return Factors(a, torch.zeros(layer.weight.shape[0], layer.rank))

    register_init(InitMethod("my_init", data="none", absorbs=True, factors=my_factors, summary="..."))
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import InitError

if TYPE_CHECKING:  # the config and the surgery report live in modules that import this one
    from .adapter import InitConfig
    from .surgery import SurgeryReport

# What a method needs besides the model: nothing; the gradient of the task about to be learned; that gradient and
# the gradient of a replay buffer of past tasks (SLICE's surgery input); the current task's batches, which its own
# `prepare` step turns into per-layer tensors (e.g. EVA's activation SVD); the current and the replay batches, for
# such a step (e.g. CorDA's covariance of the knowledge to keep).
Data = Literal["none", "current", "replay", "inputs", "replay_inputs"]
# The batch sets each kind reads: the stage loop builds these and no others (replay ones from the second stage on).
BATCH_SETS: dict[str, tuple[str, ...]] = {"none": (), "current": ("current",), "replay": ("current", "replay"),
                                          "inputs": ("current",), "replay_inputs": ("current", "replay")}
DATA = tuple(BATCH_SETS)
PREPARED = ("inputs", "replay_inputs")  # the kinds whose batches a `prepare` step reads
Gradients = dict[str, torch.Tensor]  # canonical layer name -> gradient of the loss w.r.t. that layer's weight


@dataclass(frozen=True)
class LayerInput:
    """What a method sees of one target layer: its full base weight (d_out, d_in), the gradient it asked for
    (after its `combine` step) or what its `prepare` step made for this layer (None for data-free methods), the
    adapter's rank and scaling s (the adapter adds s B A), and the layer's canonical name."""

    name: str
    weight: torch.Tensor
    grad: torch.Tensor | None
    rank: int
    scaling: float = 1.0


@dataclass(frozen=True)
class Factors:
    """A (r, d_in) and B (d_out, r), and the variance-matching scale that was applied (None if none was)."""

    a: torch.Tensor
    b: torch.Tensor
    beta: float | None = None


@dataclass(frozen=True)
class Prepared:
    """What a `prepare` step made: per-layer tensors (by canonical name, or PEFT's module name) handed to `factors`
    as `grad`; the batch sets it read (the init report counts only their batches); the settings its data decided,
    which `factors` reads in place of the config's and the report records (e.g. CorDA's kpm runs as ipm when no
    replay batches are given)."""

    tensors: Gradients
    read: tuple[str, ...] = ("current",)
    settled: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InitMethod:
    """One initialisation.

    `data`: see `Data`. `absorbs`: the base weight becomes W - s B A at init, so the model computes the same
    function right after the init (every non-zero-B method must absorb). `factors`: (A, B) for one layer; None keeps
    PEFT's own draw (Kaiming A, zero B), re-drawn from the init's seed. `combine`: for `data="replay"`, turns the
    current and replay gradients into the gradients the factors are computed from (SLICE's surgery); without replay
    batches the current gradients are used as they are. `prepare`: for `data="inputs"` or `"replay_inputs"`, (PEFT
    model, the current batches, the replay batches (always empty for "inputs"; empty at a first stage), config,
    adapter name) -> `Prepared`.
    `settings` / `combine_settings`: the settings dataclasses (init.adapter: SeedSettings, SvdSettings, ...) whose
    fields `factors` / `combine` read; InitConfig holds them all. The run config's init.* keys, the refusal of a
    setting the selected method ignores, and the study planner's prediction of which settings change a stage's
    result derive from them.
    """

    name: str
    data: Data
    absorbs: bool
    factors: Callable[[LayerInput, InitConfig], Factors] | None
    summary: str
    combine: Callable[[Gradients, Gradients, InitConfig], tuple[Gradients, SurgeryReport]] | None = None
    prepare: Callable[[torch.nn.Module, list, list, InitConfig, str], Prepared] | None = None
    settings: tuple[type, ...] = ()
    combine_settings: tuple[type, ...] = ()

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise InitError(f"init method {self.name!r}: data={self.data!r} must be one of {', '.join(DATA)}.")
        if (self.combine is not None) != (self.data == "replay"):
            raise InitError(f"init method {self.name!r}: a combine step goes with data='replay', and only with it.")
        if (self.prepare is not None) != (self.data in PREPARED):
            raise InitError(f"init method {self.name!r}: a prepare step goes with data='inputs' or 'replay_inputs', "
                            "and only with them.")
        if not all(is_dataclass(cls) for cls in self.settings + self.combine_settings):
            raise InitError(f"init method {self.name!r}: settings and combine_settings name settings dataclasses.")
        if self.factors is None and self.absorbs:
            raise InitError(f"init method {self.name!r}: PEFT's own draw has B = 0, so there is nothing to absorb.")

    def setting_names(self, combined: bool = True) -> tuple[str, ...]:
        """The InitConfig fields the method reads (without its combine step's when `combined` is False)."""
        classes = self.settings + (self.combine_settings if combined else ())
        return tuple(dict.fromkeys(f.name for cls in classes for f in fields(cls)))

    @property
    def uses_replay(self) -> bool:
        """Whether the method reads replay batches of past tasks (none at a first stage)."""
        return "replay" in BATCH_SETS[self.data]


INITS: dict[str, InitMethod] = {}


def register_init(method: InitMethod) -> InitMethod:
    """Make `method` available to init_adapter, the run config, the CLI and the stage loop."""
    if method.name in INITS:
        raise InitError(f"an init method named {method.name!r} is already registered.")
    INITS[method.name] = method
    return method


def init_names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(INITS)


def get_init(name: str) -> InitMethod:
    """The registered method `name`, or an error that suggests the nearest name."""
    if name in INITS:
        return INITS[name]
    near = difflib.get_close_matches(str(name), INITS, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise InitError(f"unknown init method {name!r}; choose one of {', '.join(INITS)}.{hint}")


def settings_of(method: InitMethod, config: InitConfig, combined: bool = True) -> dict:
    """The values of the InitConfig fields `method` reads (without its combine step's when `combined` is False)."""
    return {key: getattr(config, key) for key in method.setting_names(combined)}
