"""What the server and the devices share: the run configuration and its profiles, the schedule, the pure
adapter math, the wire payload, the round plan, data, model and training, and two small mechanisms used on both
sides (atomic file writes in ``files``, number checks in ``checks``). Nothing here imports Flower's server or
client side.
"""
