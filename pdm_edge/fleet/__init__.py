"""Fleet learning: appliances improve each other through federated adapters (Flower).

- :mod:`.delta`: the delta package (adapter minus base, metadata, sha256, Ed25519, zip);
- :mod:`.classes`: machine classes (kind, sample-rate band, tag) and the participation window;
- :mod:`.priors`: fleet priors on the appliance, import of a package through the gate;
- :mod:`.client_app`: the Flower ClientApp run by an appliance's SuperNode;
- :mod:`.server_app`: the Flower ServerApp (FedAvg or FedProx per machine class, DP);
- :mod:`.secagg`: the same rounds with Flower's SecAgg+ secure aggregation (an option);
- :mod:`.femto`: FEMTO set A leave-one-out fleet evaluation.

Only adapter tensors and metadata leave an appliance; windows, features and embeddings never do.
"""
