"""Benchmarks of MELT against LoopLM (Ouro) and a standard transformer: memory, throughput, kernels."""
