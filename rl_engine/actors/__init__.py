"""The RL loop as processes talking over ZMQ: a coordinator, a trainer group and rollout workers.

    coordinator (coordinator.py) ── owns the dataset cursor, the prompt ledger, rewards, advantages,
    │                               metrics; binds one ROUTER (+ a heartbeat socket)
    ├── trainer group (trainer_group.py): torch.distributed ranks with ParallelTrainer; rank 0 is
    │   the coordinator's peer and broadcasts its commands; colocated: hosts the engines too
    └── rollout workers (rollout_worker.py, disaggregated): one engine each; weights from the
        trainer ranks through weight_sync over ZMQ

Messages (`rl_engine.protocol`; actor -> coordinator unless noted):
    Hello, Heartbeat                 registration and liveness (every actor)
    GenerateRequest -> worker        one prompt, n samples        GenerateResult   tokens, log-probs, versions
    GenerateBatch -> trainer         colocated: a round of prompts GenerateResult   one per request
    TrainBatch -> trainer            one step's samples, flat      TrainResult      loss metrics
    UpdateWeights -> worker          take weights v now            WeightsApplied   ok / probe error
                                                                   WeightsPublished (trainer) failures
    SaveCheckpoint -> trainer        sharded checkpoint            Ack
    Shutdown -> actor                the run is over (or the worker was retired)
    ErrorReply                       answer to a malformed or unexpected message; never answered

`run.run_actors(cfg)` starts them all on one machine through `rl_engine.launch` (what `rl-engine
train CONFIG` does for placement.mode colocated / disaggregated); `ledger.PromptLedger` is the
accounting that guarantees no prompt is lost or trained twice; `wire` converts between engine
outputs, samples and messages; `group_comm` carries messages inside the trainer group.

The loop is synchronous today (rollouts of step k use weights v = k - 1 exactly). What async mode
builds on is already carried: per-token policy and KV versions in every GenerateResult and TrainBatch,
a ledger with requeue and a checkpointable state, `SaveCheckpoint`, and `UpdateWeights` as a message
a worker handles between engine steps.
"""
