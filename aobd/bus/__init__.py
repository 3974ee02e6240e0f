"""The bus: how the planes hand each other work when they scale out beyond one process.

Four streams (DESIGN.md section 6): node jobs by priority, node results, run events, and agent jobs and results.
The embedded default keeps them in process; :mod:`aobd.bus.kafka` carries them over Kafka, keyed by ``run_id`` so a
run's messages stay ordered in one partition, written by an idempotent producer and committed by consumers only
after the effect is durable. Delivery is therefore at-least-once, and consumers drop what they have already seen
by ``(run_id, seq)`` (:class:`aobd.bus.kafka.Deduper`), repairing gaps from the event log.

Nothing is imported here: the Kafka client is loaded only when its backend is chosen.
"""
