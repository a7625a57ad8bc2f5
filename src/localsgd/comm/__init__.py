"""Communicators: the only way algorithms exchange tensors."""

from localsgd.comm.base import WORLD, Block, CommStats, Communicator, Scope, World
from localsgd.comm.solo import SoloCommunicator

__all__ = ["WORLD", "Block", "CommStats", "Communicator", "Scope", "SoloCommunicator", "World"]
