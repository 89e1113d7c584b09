"""slimsd: smaller, faster Stable Diffusion — compress, export, serve, load-test."""

__version__ = "0.1.0"
