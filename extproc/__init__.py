"""zai-proxy: the ext_proc service behind Envoy for a shared Z.AI account."""

__version__ = "0.1.0"
