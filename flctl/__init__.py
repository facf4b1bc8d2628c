"""flctl: deploy and run federated learning on hosts reachable over SSH."""

__version__ = "0.1.0"
