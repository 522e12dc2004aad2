"""Test helpers for llamaswap: fakes that stand in for llama-server."""
