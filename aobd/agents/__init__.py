"""Agent providers. Every provider answers in one shape: :class:`aobd.agents.base.AgentAnswer`."""
