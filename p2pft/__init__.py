"""
p2pft: send files directly between two computers, even behind NATs.

Layers (each a module with a narrow interface):
  rendezvous -> punch -> secure -> transfer, wired together by session,
  driven by cli and the twistd plugins.
"""

__version__ = "0.1.0"
