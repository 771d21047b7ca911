"""What every strategy shares: the round loop (``fedavg``: sampling, timeouts, retries, reply
validation, aggregation incl. masked and robust rules), the server context and client discovery
(``server``), local training (``training``), width-scaled sub-models (``submodels``), streaming
aggregation (``streaming``), checkpoints, records (torch <-> Flower), results, seeds, the
task (data, partition and model for a config) and the centralised reference (``central``).

Arrows point down: nothing here imports ``distill``, ``methods`` or ``registry``."""
