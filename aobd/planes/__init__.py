"""The multi-process daemon: a supervisor and its process groups (planes), talking over zmq ipc sockets.

Roles (one process each, several of some):
- ``orchestrator`` (control plane): drives the runs of its shard (:func:`aobd.planes.paths.shard_of`); serves
  the Service over zmq RPC to the accept workers; sends function/http attempts to the runner plane.
- ``accept`` (control plane): HTTP/2 accept workers sharing the API port with SO_REUSEPORT; forward each call
  to the orchestrator owning the run; serve live streams from the fanout plane.
- ``runner`` (runner plane): executes node attempts (:class:`aobd.runner.worker.Runner`).
- ``fanout`` (fanout plane): forwards every committed event from the orchestrators to the accept workers.

Socket addresses are all in :mod:`aobd.planes.paths`.
"""
