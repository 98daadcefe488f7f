"""MABL: multi-agent bi-level latent-variable world model (Venugopal et al., AAMAS 2024)."""
__version__ = "0.1.0"
