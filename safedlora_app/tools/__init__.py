"""Tools around the app: the local Flower runner (simulation) and ``safedlora compare``."""
