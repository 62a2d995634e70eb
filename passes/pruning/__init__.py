"""Structured pruning: channel-dependency analysis, importance, surgery and recovery (`prune`)."""

from graphopt.passes.pruning.dependency import Analysis, ChannelInfo, Group, analyze
from graphopt.passes.pruning.flops import count_flops, count_params, layer_flops, uncounted_layers
from graphopt.passes.pruning.prune import Prune

__all__ = ["Analysis", "ChannelInfo", "Group", "Prune", "analyze", "count_flops", "count_params", "layer_flops", "uncounted_layers"]
