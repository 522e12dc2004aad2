"""llamaswap: one OpenAI-compatible endpoint in front of many on-demand llama-server children."""

__version__ = "0.1.0"
