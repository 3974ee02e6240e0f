"""The coordinator: a sans-IO run state machine (``machine``) and the asyncio driver that feeds it (``driver``)."""
