"""The sans-IO verification core: no web framework, no asyncio, no sockets."""
