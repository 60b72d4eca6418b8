"""Benchmarks (BENCHMARKS.md): training throughput and precision, decoders' speed beside quality."""
