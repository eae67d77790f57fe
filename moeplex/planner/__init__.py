"""The QoS planner: profile expert-precision configurations of a store, draw their Pareto frontier, choose one.

Import from the modules; this package file stays empty so that `moeplex --help` imports no torch.
"""
