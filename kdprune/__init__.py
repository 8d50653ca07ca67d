"""kdprune: train a teacher, distil a student, prune it, search how to train, evaluate and register.

The core package needs only torch, torchvision and light dependencies; Prefect, MLflow and DVC are used by the
drivers (flows/, tasks/, kdprune.tracking) at the edges.
"""

__version__ = "0.1.0"
