"""A channel group: the coupled channels a cut removes together, the layers that produce and read them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChannelGroup"]


@dataclass
class ChannelGroup:
    """A set of coupled channels removed together; channel j is channel j of the root module's output."""

    name: str
    size: int
    producers: list[str]
    # producer module -> (channel positions in its output, the group channel of each position)
    index: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict, repr=False)
    # conv/linear layers whose output (input) channels carry the group: name -> channels per group channel
    out_layers: dict[str, int] = field(default_factory=dict, repr=False)
    in_layers: dict[str, int] = field(default_factory=dict, repr=False)
    input_shape: tuple[int, ...] = field(default=(), repr=False)
    # channels per group channel: the conv groups of the grouped convs it passes through (1 without any)
    conv_groups: int = 1
    ignore: tuple[str, ...] = field(default=(), repr=False)  # the modules kept whole when the groups were found
