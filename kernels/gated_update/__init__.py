from .naive import naive_gated_update
from .triton_impl import gated_update, gated_update_bwd, gated_update_fwd

__all__ = ["gated_update", "gated_update_fwd", "gated_update_bwd", "naive_gated_update"]
