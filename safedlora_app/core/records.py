"""Names of the records in a message between the ServerApp and a ClientApp (a module without torch, so that the
ClientApp's limits query imports nothing heavy)."""

#: The tensors, the metrics, what a node says about itself, its declared limits.
ARRAYS, METRICS, NODE, LIMITS = "arrays", "metrics", "node", "limits"
