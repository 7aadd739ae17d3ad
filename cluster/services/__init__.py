"""The local stack's services, one module each (cluster/stack.py supervises them), in the order `up` starts them."""

from cluster.services.base import Service
from cluster.services.mlflow import MLflow
from cluster.services.ray import Ray
from cluster.services.s3 import S3

REGISTRY: dict[str, Service] = {s.name: s for s in (S3(), MLflow(), Ray())}
