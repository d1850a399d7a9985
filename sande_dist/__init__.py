"""sande-dist: remove backdoors from generative LLMs with OSFT / SANDE at full scale."""

__version__ = "0.1.0"
