"""rim-agents: Recurrent Independent Mechanisms as the recurrent core of PPO agents."""

from rim_agents.policy import CnnRIMPolicy, MlpRIMPolicy, MultiInputRIMPolicy, RIMPolicy
from rim_agents.ppo import RIMPPO
from rim_agents.rim import RIMCell, RIMCore

__all__ = ["RIMPPO", "CnnRIMPolicy", "MlpRIMPolicy", "MultiInputRIMPolicy", "RIMCell", "RIMCore", "RIMPolicy"]
__version__ = "0.1.0"
