"""rim-agents: Recurrent Independent Mechanisms as the recurrent core of PPO agents."""

from rim_agents.rim import RIMCell, RIMCore

__all__ = ["RIMCell", "RIMCore"]
__version__ = "0.1.0"
