"""`python -m melt.demo`: generate with a small random MELT model and compare its cache with LoopLM's.

A quick look at the memory claim on any machine: the same weights run as MELT (`shared`) and as
LoopLM/Ouro (`per_loop`) for several loop counts; MELT's cache stays the same size, LoopLM's grows
linearly. Weights are random, so the generated ids are meaningless; the byte counts are exact.
"""

from __future__ import annotations

import argparse

import torch

from .configuration_melt import MeltConfig
from .modeling_melt import MeltForCausalLM


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (tokens)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8], help="loop counts to compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = MeltConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, chunk_size=64,
    )
    shared = MeltForCausalLM(config).eval()
    per_loop = MeltForCausalLM(MeltConfig(**{**config.to_dict(), "cache_mode": "per_loop"})).eval()
    per_loop.load_state_dict(shared.state_dict(), strict=False)  # the same Ouro weights, no gate
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_tokens))
    total = args.prompt_tokens + args.new_tokens

    print(f"{'loops':>5} | {'MELT KV (KiB)':>13} | {'LoopLM KV (KiB)':>15} | ratio | MELT tokens")
    with torch.no_grad():
        for loops in args.loops:
            rows = []
            for model in (shared, per_loop):
                out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, num_loops=loops,
                                     pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
                rows.append(out)
            melt_bytes, loop_bytes = (o.cache.nbytes() for o in rows)
            sample = rows[0].sequences[0, args.prompt_tokens : args.prompt_tokens + 6].tolist()
            print(f"{loops:>5} | {melt_bytes / 1024:>13.1f} | {loop_bytes / 1024:>15.1f} | "
                  f"{loop_bytes / melt_bytes:>5.1f} | {sample}")
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    print(f"\nMELT keeps {per_token} B per token (N x 2 x kv_heads x head_dim x 4 B) for any loop count; "
          f"after {total - 1} cached tokens that is {per_token * (total - 1) / 1024:.1f} KiB.")


if __name__ == "__main__":
    main()
