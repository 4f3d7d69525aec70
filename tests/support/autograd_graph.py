"""The autograd graph behind a tensor, for tests that check which nodes a step builds."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def graph_nodes(output: Tensor) -> list[Any]:
    """Every node reachable from ``output.grad_fn`` (each once, depth first)."""
    nodes: list[Any] = []
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes
