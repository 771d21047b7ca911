"""Support for tests and benchmarks: an in-process Grid (``inprocess``) that drives the
ClientApp's handlers without Ray or a SuperLink. Not used by the apps."""
