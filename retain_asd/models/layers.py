"""Layer selection shared by the encoder families (BEATs, EAT): 1-based layers, as the paper counts them."""

from __future__ import annotations

from collections.abc import Sequence


def deepest_layer(layers: int | Sequence[int] | None, num_layers: int) -> int:
    """The deepest of the requested 1-based `layers` (all `num_layers` for None); a clear error for an empty
    request or a layer out of 1..num_layers (a bool is not a layer)."""
    if layers is None:
        return num_layers
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ValueError("layers is empty: pass a 1-based layer, a list of them, or None for all")
    for layer in requested:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer!r} is out of range: layers are 1-based, 1..{num_layers}")
    return max(requested)
