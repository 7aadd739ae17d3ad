"""How to get a cluster: the local stack on loopback (`python -m cluster.stack`), the Ray cluster
launcher YAML for AWS, and KubeRay manifests."""
