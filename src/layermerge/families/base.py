"""The model-family interface.

A *family* is everything about a kind of model that the rest of the library
must not know: how to read a chain off it, how to build the train-time network
of a plan and merge it into the deploy network, what an example input looks
like, and how one option is timed. CNNs that torch.fx can trace are one
family; diffusers ``UNet2DModel`` is another. The core (tracing, transform,
latency, importance, training, the pipeline, export, the CLI) talks only to
this interface, through :mod:`layermerge.families` (the registry).

Networks a family builds carry their provenance as ``layermerge_*`` attributes
(:func:`mark`): ``layermerge_family`` (the family's name), ``layermerge_plan``
(the plan as a dict) and ``layermerge_input_shape``; a family may add its own
(:func:`copy_marks` carries them all from a train-time to a deploy network).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..chain import Chain, Skip

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import Plan, PlanBlock


class TraceError(RuntimeError):
    """The model cannot be turned into a chain."""


class MergeVerificationError(RuntimeError):
    """The merged network does not compute what the train-time network computes."""


MARK_PREFIX = "layermerge_"


def mark(net: nn.Module, family: Family | str, plan: Plan, input_shape, **extra: Any) -> None:
    """Record on ``net`` which family built it, from which plan and for which input."""
    net.layermerge_family = family if isinstance(family, str) else family.name
    net.layermerge_plan = plan.to_dict()
    net.layermerge_input_shape = tuple(input_shape)
    for k, v in extra.items():
        setattr(net, MARK_PREFIX + k, v)


def copy_marks(src: nn.Module, dst: nn.Module) -> None:
    """Carry every ``layermerge_*`` attribute of ``src`` over to ``dst``."""
    for k, v in vars(src).items():
        if k.startswith(MARK_PREFIX):
            setattr(dst, k, v)


def param_of(net: nn.Module) -> torch.Tensor | None:
    """The first parameter (or buffer) of ``net``: its dtype and device."""
    for p in net.parameters():
        return p
    for b in net.buffers():
        return b
    return None


@dataclass(eq=False)
class TracedModel:
    """A model together with its chain. Families subclass it with what they need to
    build networks from a plan (fx locations, block paths, ...)."""

    model: nn.Module  # the model the chain was read off (eval mode)
    chain: Chain

    #: the family that traced it (set on each subclass)
    family: ClassVar[Family]

    @property
    def fingerprint(self) -> str:
        return self.chain.fingerprint()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.chain.input_shape)

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


class Family(ABC):
    """What the core needs from a kind of model. Subclasses are stateless; the
    registry holds one instance of each."""

    #: unique name, stored on the networks the family builds (``layermerge_family``)
    name: ClassVar[str]
    #: whether the models are denoisers called as ``model(x, t)`` (diffusion sampling)
    takes_timestep: ClassVar[bool] = False

    # -- recognising and tracing -------------------------------------------------

    @abstractmethod
    def claims(self, model: nn.Module) -> bool:
        """Whether this family handles ``model`` (checked in registry order)."""

    def default_input_shape(self, model: nn.Module) -> tuple[int, ...] | None:
        """(C, H, W) of one example when the model itself says (None: unknown)."""
        return None

    @abstractmethod
    def trace(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        include_stem: bool = False,
        include_head: bool = False,
        freeze: Sequence[str] = (),
    ) -> TracedModel:
        """The chain of ``model`` (TraceError when it cannot be represented)."""

    # -- plan -> train-time network -> deploy network ------------------------------

    @abstractmethod
    def apply(self, traced: TracedModel, plan: Plan) -> nn.Module:
        """The train-time network of a (checked) plan: trainable, holding the original
        weights, exactly equal to the deploy network it merges into. Must :func:`mark` it."""

    @abstractmethod
    def merge(self, train_net: nn.Module) -> nn.Module:
        """The deploy network of a train-time network (eval mode; a copy; marks copied).
        Verification is the core's job (:func:`layermerge.transform.merge`)."""

    # -- inputs and outputs ------------------------------------------------------

    def example_inputs(
        self,
        net: nn.Module,
        batch: int = 1,
        *,
        generator: torch.Generator | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Positional inputs of ``net`` (a model, train-time or deploy network) for a
        batch: random when ``generator`` is given (verification), zeros otherwise."""
        shape = tuple(input_shape or net.layermerge_input_shape)
        p = param_of(net)
        dtype = p.dtype if p is not None else torch.float32
        device = p.device if p is not None else torch.device("cpu")
        if generator is None:
            return (torch.zeros(batch, *shape, dtype=dtype, device=device),)
        x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
        return (x.to(device, dtype),)

    def output_tensor(self, y: Any) -> torch.Tensor:
        """The network's output as one flat float64 tensor (for comparisons)."""
        if isinstance(y, torch.Tensor):
            return y.double().flatten()
        if hasattr(y, "sample") and isinstance(y.sample, torch.Tensor):
            return y.sample.double().flatten()
        if isinstance(y, dict):
            y = list(y.values())
        return torch.cat([self.output_tensor(t) for t in y])

    def forward_module(self, net: nn.Module) -> nn.Module:
        """``net`` as a module of one tensor input and one tensor output, which the
        latency backends time and the exporters write (the identity for CNNs)."""
        return net

    def export_module(self, net: nn.Module) -> nn.Module:
        """``net`` as the exporters write it, taking all of the model's inputs (a
        UNet's sample and timestep); default: :meth:`forward_module`."""
        return self.forward_module(net)

    # -- verification, importance, counting, latency --------------------------------

    def randomize_for_verification(self, train_net: nn.Module, seed: int) -> None:
        """Give parameters that are the identity when fresh (a normalisation the
        family adds) random values, so verification checks their folding. In place."""
        return None

    @abstractmethod
    def reinit_single_conv(self, train_net: nn.Module, option: PlanBlock, chain: Chain) -> None:
        """Reset the kept conv (and its BatchNorm) of a one-conv block in place: how
        the importance protocol scores single convs."""

    @abstractmethod
    def count_layers(self, net: nn.Module) -> dict[str, int]:
        """``{"convs": ..., "activations": ...}`` on the network's main path."""

    @abstractmethod
    def option_module(self, traced: TracedModel, option: PlanBlock) -> nn.Module:
        """What one option costs in the deploy network (its merged conv, with what
        follows it there: the residual adds it owns and its end activation, see
        :func:`owned_skips`), with random weights: the latency table times this on
        inputs of :meth:`option_input_shapes`."""

    def option_input_shapes(
        self, traced: TracedModel, option: PlanBlock
    ) -> tuple[tuple[int, ...], ...]:
        """(C, H, W) of each input of :meth:`option_module`: the option's start node,
        then one per extra input the module takes (default: none)."""
        return (tuple(traced.chain.nodes[option.start].shape),)


def owned_skips(chain: Chain, option: PlanBlock) -> list[Skip]:
    """The residual adds that survive at ``option.end`` when ``option`` is a block.

    A skip ``(p, q)`` is folded into the merged kernel of a block that contains it
    (``s <= p`` and ``q <= e``); otherwise its add stays in the deploy network, right
    after the conv of node ``q``, before node ``q``'s activation. The block that
    decides it is the one ending at ``q``: the add survives exactly when that block
    starts after ``p``. Such an option *owns* the add, and its latency entry
    includes it (with the skip's projection conv, which a folding block removes too).
    """
    return [sk for sk in chain.skips if sk.end == option.end and sk.start < option.start]


def context_input_shapes(chain: Chain, option: PlanBlock) -> tuple[tuple[int, ...], ...]:
    """Inputs of an :class:`OptionInContext` of ``option``: the start node, then the
    tensor of each owned skip's start node."""
    return (tuple(chain.nodes[option.start].shape),) + tuple(
        tuple(chain.nodes[sk.start].shape) for sk in owned_skips(chain, option)
    )


class OptionInContext(nn.Module):
    """One option as the deploy network runs it: ``post(body(x) + sum_i skip_i(z_i))``.

    ``body`` is the merged conv (the identity for an empty option), ``skips`` one
    module per owned residual add (its projection conv, or the identity), ``post``
    what follows the add (end activation, normalisation; the identity when none).
    Timed as one module, so that a runtime that fuses conv + add + activation inside
    the network fuses them here too.
    """

    def __init__(
        self, body: nn.Module, skips: Sequence[nn.Module] = (), post: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.body = body
        self.skips = nn.ModuleList(skips)
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        for proj, z in zip(self.skips, zs, strict=True):
            y = y + proj(z)
        return self.post(y)


def skip_module(chain: Chain, skip: Skip) -> nn.Module:
    """The module a surviving skip runs on its way to the add: its projection conv
    (BatchNorm folded, so with a bias) with random weights, or the identity."""
    if skip.projection is None:
        return nn.Identity()
    return nn.Conv2d(
        chain.nodes[skip.start].shape[0],
        chain.nodes[skip.end].shape[0],
        skip.projection_kernel,
        stride=skip.projection_stride,
        padding=skip.projection_padding,
        bias=True,
    )
