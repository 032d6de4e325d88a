"""rim-agents: Recurrent Independent Mechanisms as the recurrent core of PPO agents.

Importing the package registers its environments (``RIMAgents/...``) and ALE's with gymnasium, as
``import minigrid`` does for MiniGrid's: ``gymnasium.make("RIMAgents/Pickup-8x8-v0")`` after
``import rim_agents``, or ``gymnasium.make("rim_agents:RIMAgents/Pickup-8x8-v0")`` with no import.
"""

from rim_agents.envs.registration import register_envs
from rim_agents.policy import CnnRIMPolicy, MlpRIMPolicy, MultiInputRIMPolicy, RIMPolicy
from rim_agents.ppo import RIMPPO
from rim_agents.rim import RIMCell, RIMCore

__all__ = ["RIMPPO", "CnnRIMPolicy", "MlpRIMPolicy", "MultiInputRIMPolicy", "RIMCell", "RIMCore", "RIMPolicy"]
__version__ = "0.1.0"

register_envs()
