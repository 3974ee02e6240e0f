"""Node attempts executed away from the orchestrator that owns the run.

The orchestrator's driver calls an executor per attempt; :class:`aobd.runner.remote.RemoteExecutor` is an
executor whose attempts travel as :class:`aobd.runner.wire.NodeJob` over a transport (zmq to the local runner
plane, or Kafka's ``node.jobs.*`` topics to any daemon of a cluster) and come back as
:class:`aobd.runner.wire.NodeOutcome`. :func:`aobd.runner.worker.run_job` is the runner side, shared by both
transports. Recording stays with the orchestrator: execution is at least once, completion exactly once.
"""
