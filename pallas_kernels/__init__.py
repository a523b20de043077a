"""Pallas GPU kernels, each beside a pure-JAX reference and a dispatcher that picks one by backend."""
