"""Training-time continual-learning methods: hooks around each stage, composable with every initialisation.
A method that reads LoRA's factors says why in `lora_only`; other adapter types (OSF) refuse it.

The init writes the adapter's A and B; a method acts around training. The stage loop calls, for every active
method, in this order:

    check(model)                       right after the model loads, before any work (InfLoRA: k < d_in)
    input_subspaces(stage)             input directions the new adapter's A must not read, given to the init
                                       (InfLoRA: the past tasks' top input directions)
    examples(stage, examples)          the stage's training data (experience replay adds past examples)
    penalty(model)                     a term added to the loss of every optimisation step (O-LoRA)
    after_stage(stage, trained)        with the trained adapter's factors, before the merge (O-LoRA keeps A)
    after_merge(stage, model, tok)     with the merged model (InfLoRA accumulates the task's input covariance)

A method's state is saved with each finished stage (`cl_state.safetensors`, written before the stage's
`train.json` marks it trained) and restored by --resume, so a resumed run continues with the same state. A new
method is one subclass and one `register_cl` call; `cl.method` selects it, `cl.*` holds its settings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..data.prompts import make_batches
from ..data.tasks import Example, Task
from ..errors import ConfigError
from ..init.gradients import canonical_name, oriented, target_layers

if TYPE_CHECKING:  # the run config names the registered methods, so it imports this module
    from .config import RunConfig

Factors = dict[str, torch.Tensor]  # the trained adapter's "<canonical layer name>.A" / ".B" (init.adapter_factors)


@dataclass(frozen=True)
class Stage:
    """What a hook knows of the stage: its number, the tasks it learns and the tasks learned before it."""

    number: int
    learn: list[Task]
    past: list[Task]


class ContinualMethod:
    """A training-time method; every hook defaults to doing nothing."""

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()  # the cl.* fields it reads
    lora_only: ClassVar[str] = ""  # why it needs LoRA adapters (their A and B), when it does

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def check(self, model: torch.nn.Module) -> None:
        return None

    def input_subspaces(self, stage: Stage) -> dict[str, torch.Tensor]:
        return {}

    def examples(self, stage: Stage, examples: list[Example]) -> list[Example]:
        return examples

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def after_stage(self, stage: Stage, trained: Factors) -> None:
        return None

    def after_merge(self, stage: Stage, model: torch.nn.Module, tokenizer) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


CL_METHODS: dict[str, type[ContinualMethod]] = {}


def register_cl(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Make a method selectable as `cl.method: <cls.name>`."""
    if not cls.name or cls.name in CL_METHODS or cls.name == "none":
        raise ConfigError(f"a continual-learning method needs a new, non-empty name other than 'none': {cls.name!r}.")
    CL_METHODS[cls.name] = cls
    return cls


def cl_names() -> tuple[str, ...]:
    return ("none", *CL_METHODS)


def replay_buffer(task: Task, size: int, seed: int) -> list[Example]:
    """A fixed, seed-determined sample of a past task's train split (the same at every later stage)."""
    rng = random.Random(f"{seed}:{task.name}")
    return rng.sample(task.train, min(size, len(task.train)))


class ExperienceReplay(ContinualMethod):
    """Experience replay: `train.replay_examples` examples of each past task (a fixed, seeded buffer) mixed into
    the stage's training data. Active whenever train.replay_examples > 0, together with `cl.method`."""

    name = "replay"

    def examples(self, stage: Stage, examples: list[Example]) -> list[Example]:
        for old in stage.past:
            examples = examples + replay_buffer(old, self.config.train.replay_examples, self.config.seed)
        return examples


class OLoRA(ContinualMethod):
    """O-LoRA (arXiv 2310.14152): keep each finished stage's A (r x d_in per layer); while training a later stage
    add lambda * sum over past stages and layers of |A A_past^T|_F^2 to the loss, pushing the new adapter's rows
    orthogonal to the old ones. The adapters are still merged; the old A's are only anchors."""

    name = "olora"
    settings = ("olora_lambda",)
    lora_only = "it keeps every past stage's LoRA A and penalises the new A's overlap with them"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.anchors: dict[str, torch.Tensor] = {}  # layer -> the past stages' A's stacked, (sum of r, d_in)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        if not self.anchors:
            return None
        terms = []
        for name, a in lora_a_weights(model).items():
            past = self.anchors[name].to(a.device, a.dtype)
            terms.append((a @ past.T).pow(2).sum())
        return self.config.cl.olora_lambda * torch.stack(terms).sum()

    def after_stage(self, stage: Stage, trained: Factors) -> None:
        for key, a in trained.items():
            if not key.endswith(".A"):
                continue
            name, a = key.removesuffix(".A"), a.float()
            self.anchors[name] = torch.cat([self.anchors[name], a]) if name in self.anchors else a

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"anchors/{name}": a.contiguous() for name, a in self.anchors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.anchors = {key.removeprefix("anchors/"): t for key, t in state.items() if key.startswith("anchors/")}


class InfLoRA(ContinualMethod):
    """InfLoRA (arXiv 2404.00228): after each stage, accumulate per target layer the covariance C = sum x x^T of
    that task's training inputs on the merged model (`cl.inflora_batches` batches of `cl.inflora_batch_size`); the
    next stage's A is initialised as A (I - U U^T), U the top `cl.inflora_rank` eigenvectors of the summed C of all
    past tasks, so the new update barely moves the outputs on past inputs. The init absorbs the projected A, so the
    model's function is unchanged at the start (absorbing inits too)."""

    name = "inflora"
    settings = ("inflora_rank", "inflora_batches", "inflora_batch_size")
    lora_only = "it starts the new LoRA adapter's A off the past tasks' input directions"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.covariance: dict[str, torch.Tensor] = {}  # layer -> sum of x x^T over past tasks' inputs, float64

    def check(self, model: torch.nn.Module) -> None:
        k = self.config.cl.inflora_rank
        for name, layer in target_layers(model, tuple(self.config.adapter.targets)).items():
            d_in = oriented(layer, layer.weight).shape[1]
            if k >= d_in:
                raise ConfigError(f"cl.inflora_rank={k} must be < d_in = {d_in} of layer {name!r} "
                                  "(it keeps k input directions and leaves the rest to the new adapter); lower it.")

    def input_subspaces(self, stage: Stage) -> dict[str, torch.Tensor]:
        k = self.config.cl.inflora_rank
        return {name: torch.linalg.eigh(c)[1][:, -k:] for name, c in self.covariance.items()}  # eigh: ascending

    def after_merge(self, stage: Stage, model: torch.nn.Module, tokenizer) -> None:
        cl, train = self.config.cl, self.config.train
        batches = make_batches([ex for task in stage.learn for ex in task.train], tokenizer, cl.inflora_batch_size,
                               train.max_length, seed=self.config.seed + stage.number, num_batches=cl.inflora_batches)
        mask: list[torch.Tensor] = []
        # x^T x of each input seen in this batch, by the input tensor itself (kept alive, so no other tensor takes its
        # memory meanwhile): q/k/v (and gate/up) read one input and share one product
        products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def accumulate(name: str):
            def hook(module, args) -> None:
                x = args[0]
                if id(x) not in products:  # float32 products, summed over batches in float64
                    tokens = x[mask[0]].float()  # the real tokens' inputs, (tokens, d_in)
                    products[id(x)] = (x, (tokens.T @ tokens).double())
                c = products[id(x)][1]
                self.covariance[name] = self.covariance[name] + c if name in self.covariance else c.clone()
            return hook

        device = next(model.parameters()).device
        handles = [layer.register_forward_pre_hook(accumulate(name))
                   for name, layer in target_layers(model, tuple(self.config.adapter.targets)).items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    mask[:] = [batch["attention_mask"].bool().to(device)]
                    products.clear()
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"covariance/{name}": c.cpu().contiguous() for name, c in self.covariance.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.covariance = {k.removeprefix("covariance/"): v for k, v in state.items() if k.startswith("covariance/")}


register_cl(ExperienceReplay)
register_cl(OLoRA)
register_cl(InfLoRA)


def lora_a_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical layer name -> the live A (the `default` adapter's) of every LoRA layer of a PEFT model."""
    return {canonical_name(name): module.lora_A["default"].weight for name, module in model.named_modules()
            if "default" in getattr(module, "lora_A", {})}


def active_methods(config: RunConfig) -> list[ContinualMethod]:
    """The methods a run uses: experience replay when train.replay_examples > 0, then `cl.method`."""
    methods: list[ContinualMethod] = [ExperienceReplay(config)] if config.train.replay_examples else []
    if config.cl.method not in ("none", ExperienceReplay.name):
        methods.append(CL_METHODS[config.cl.method](config))
    return methods
