"""Tools around the app: the local Flower runner (simulation), shared by the tests, the benchmarks and the lab."""
