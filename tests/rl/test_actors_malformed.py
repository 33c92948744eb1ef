"""Each actor answers a malformed or unexpected message with an ErrorReply, logs it, and keeps
serving: a rollout worker and a (colocated) trainer rank are started as real processes against a
fake coordinator (this test's ROUTER socket), fed garbage, then real work, then Shutdown. (The
coordinator's half is in test_actors_e2e: garbage sent to it mid-run.)"""

import time
from collections import defaultdict

import msgspec
import torch
import zmq

from rl_actor_helpers import toy_config
from rl_engine import protocol as P
from rl_engine.actors.run import prepare
from rl_engine.auth import RunAuth
from rl_engine.launch import LocalLauncher, ProcessSpec
from rl_engine.launch.heartbeat import HeartbeatMonitor

UNKNOWN = msgspec.msgpack.encode({"version": P.PROTOCOL_VERSION,
                                  "msg": msgspec.Raw(msgspec.msgpack.encode({"type": "Teleport", "to": "mars"}))})


class FakeCoordinator:
    def __init__(self, auth: RunAuth) -> None:
        self.auth = auth
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        auth.serve(self.socket, peers=["rollout-0", "trainer"])
        self.address = P.bind(self.socket)
        self.inbox: dict[str, list[P.Message]] = defaultdict(list)

    def next_from(self, actor: str, timeout_s: float = 120.0) -> P.Message:
        deadline = time.monotonic() + timeout_s
        while not self.inbox[actor]:
            assert self.socket.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"nothing from {actor}"
            route, msg = P.recv_msg(self.socket, num_route_frames=1, auth=self.auth)
            self.inbox[route[0].decode()].append(msg)
        return self.inbox[actor].pop(0)

    def send(self, actor: str, msg: P.Message | bytes) -> None:
        if isinstance(msg, bytes):
            self.socket.send_multipart([actor.encode(), msg])
        else:
            P.send_msg(self.socket, msg, route=[actor.encode()])


def test_actors_answer_bad_messages_and_keep_serving(tmp_path):
    cfg, config_path = prepare(toy_config(tmp_path, "placement.mode=colocated"))
    auth = RunAuth.generate()
    coordinator = FakeCoordinator(auth)
    heartbeats = HeartbeatMonitor(timeout_s=600, on_dead=lambda peer: None, auth=auth,
                                  peers=["rollout-0", "trainer"]).start()
    links = ["--config", config_path, "--coordinator", coordinator.address, "--heartbeat", heartbeats.address]
    specs = [ProcessSpec(name="rollout-0", module="rl_engine.actors.rollout_worker",
                         args=[*links, "--worker-id", "rollout-0"]),
             ProcessSpec(name="trainer-0", module="rl_engine.actors.trainer_group", args=links, dist_rank=0)]
    launcher = LocalLauncher(specs, log_dir=tmp_path / "logs", grace_period_s=3, env=auth.child_env())
    launcher.start()
    try:
        hello = {name: coordinator.next_from(name) for name in ("rollout-0", "trainer")}
        assert hello["rollout-0"].role == "rollout" and hello["rollout-0"].capabilities["weights_address"]
        assert hello["trainer"].capabilities["placement"] == "colocated"

        unexpected = {"rollout-0": P.TrainResult(step=1, policy_version=1, metrics={}),
                      "trainer": P.UpdateWeights(version=1)}
        for name in hello:
            for bad in (b"\xc1garbage", UNKNOWN, unexpected[name], P.ErrorReply(code="x", message="never answered")):
                coordinator.send(name, bad)
        for name in hello:
            replies = [coordinator.next_from(name) for _ in range(3)]
            assert [type(r) for r in replies] == [P.ErrorReply] * 3, replies
            assert [r.code for r in replies] == [P.ERROR_PROTOCOL, P.ERROR_PROTOCOL, P.ERROR_UNEXPECTED]
            assert "Teleport" in replies[1].message and type(unexpected[name]).__name__ in replies[2].message

        # Still serving: the same request to both engines gives the same tokens (same weights, same seed),
        # and a prompt the engine cannot take is refused in a GenerateResult, not by crashing.
        sampling = P.WireSamplingParams(max_tokens=5, seed=7, temperature=1.0)
        request = P.GenerateRequest(request_id="0:0#1", sample_ids=["s0", "s1"], prompt_token_ids=[5, 6, 7, 8],
                                    sampling=sampling, policy_version=0)
        too_big = P.GenerateRequest(request_id="0:1#1", sample_ids=["t0"], prompt_token_ids=[10**6],
                                    sampling=sampling, policy_version=0)
        coordinator.send("rollout-0", request)
        coordinator.send("rollout-0", too_big)
        coordinator.send("trainer", P.GenerateBatch(requests=[request, too_big]))
        answers = {name: {m.request_id: m for m in (coordinator.next_from(name) for _ in range(2))} for name in hello}
        for name, got in answers.items():
            assert isinstance(got["0:0#1"], P.GenerateResult) and len(got["0:0#1"].samples) == 2, name
            assert "token ids must lie in" in got["0:1#1"].error and not got["0:1#1"].samples, name
        worker, trainer = answers["rollout-0"]["0:0#1"], answers["trainer"]["0:0#1"]
        for a, b in zip(worker.samples, trainer.samples):
            assert a.sample_id == b.sample_id and torch.equal(a.token_ids, b.token_ids)
            assert torch.allclose(a.behavior_logprobs, b.behavior_logprobs, atol=1e-5)

        for name in hello:
            coordinator.send(name, P.Shutdown(reason="test over"))
        deadline = time.monotonic() + 60
        while (result := launcher.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert result is not None and result.status == "completed", result and result.summary()
        assert [p.returncode for p in result.processes] == [0, 0]
    finally:
        launcher.stop()
        heartbeats.stop()
        coordinator.socket.close()
