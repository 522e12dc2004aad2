"""twistd plugin: ``twistd -n llamaswap --config config.yaml``."""

from twisted.application.service import ServiceMaker

llamaswap = ServiceMaker(
    "llamaswap",
    "llamaswap.tap",
    "OpenAI-compatible proxy that starts and swaps llama-server models on demand",
    "llamaswap",
)
