"""FedHypeVAE: differentially private, hypernetwork-generated conditional VAEs, federated."""

__version__ = "0.1.0"
