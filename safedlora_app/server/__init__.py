"""What runs on the SuperLink's side: the strategy and its hooks, each node's messages, the aggregation, reply
checks, round deadlines, the global model, checkpoints and the run's outputs.
"""
