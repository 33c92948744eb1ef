"""`run_checkpoint.commit`: what a killed run leaves behind is cleaned up by the next commit."""

import json
import os

from rl_engine import run_checkpoint as rc


def test_commit_names_the_newest_and_removes_leftovers(tmp_path):
    out = str(tmp_path)
    for step in (1, 2, 3, 5):
        os.makedirs(rc.step_dir(out, step))
    root = rc.checkpoints_root(out)
    open(os.path.join(root, "latest.json.tmp4242"), "w").close()  # killed while rewriting latest.json
    assert rc.latest(out) is None
    path = rc.commit(out, 3, keep=2)
    # step 5 was written but never committed (the run died): it goes; step 1 is past `keep`.
    assert sorted(os.listdir(root)) == ["latest.json", "step_000002", "step_000003"]
    assert rc.latest(out) == path and json.loads(open(os.path.join(root, "latest.json")).read())["step"] == 3
    assert rc.resolve_resume(out, "auto") == path and rc.checkpoint_step(path) == 3
