"""Channels of a model: tracing, channel groups, masks, cost, planning and the physical cut."""
