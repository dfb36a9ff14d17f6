"""What runs on a device next to the ClientApp: the node's resources (data, model and caches)."""
