"""holotx.adapters: holotx transforms behind the ``torch.optim.Optimizer`` interface.

Installed as ``holotx.adapters`` (the folder sits at the top level of the repository).
"""
