"""Tools for people running the product: the local tritonserver launcher and the NGINX proxy
(config renderer and a local instance for tests and scale-out trials)."""
