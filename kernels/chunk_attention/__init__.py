# The phase-1 blend KV = alpha * KV_melt + (1 - alpha) * KV_loop is deliberately NOT fused into the
# attention loads. It exists only during phase-1 training (~500 steps while alpha rises to 1); the
# model blends each token's rows once, with torch.lerp, when the token's chunk is done, and stores them in
# the cache's loop slot t, which is all that loop t's queries then read (melt/cache_melt.py). That is one
# element-wise pass per row and T row copies per token in phase 1, cheap next to the attention that serves
# each row to C queries (C = 500 in training), and autograd differentiates it for free. Fusing would double
# every forward and backward kernel variant (a second K/V source per key segment, alpha, and gradients
# flowing into both sources) and put a training-only path into the kernels that decode runs. `torch.lerp` is
# also the reference the spec asks for.
from .naive import naive_chunk_attention
from .triton_impl import chunk_attention, chunk_attention_bwd, chunk_attention_fwd

__all__ = ["chunk_attention", "chunk_attention_fwd", "chunk_attention_bwd", "naive_chunk_attention"]
