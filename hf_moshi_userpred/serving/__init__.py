"""The live path: streaming Mimi, the real-time engine (in process or in its own), the aiohttp server and its page,
the output limiter, and streaming a recording through the model."""
