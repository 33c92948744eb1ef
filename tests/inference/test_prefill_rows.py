"""An eager (flat) step computes the last layer's attention output projection and MLP, and the final norm, for
the rows it samples only (`ModelRunner._run_flat` passes them to `hidden_states(rows=...)`): the same tokens and
log-probs as computing every row, with fewer rows through the last layer."""

from __future__ import annotations

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams


def _generate(llm: LLM, prompts: list[list[int]], *, select_rows: bool) -> tuple[list, list[tuple[int, int]]]:
    """Outputs, and per forward (rows through the first layer's MLP, rows through the last layer's MLP)."""
    llm.engine.runner._select_rows = select_rows
    llm.reset_prefix_cache()
    layers = llm.model.layers
    seen: list[list[int]] = [[], []]
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: seen[i].append(args[0].shape[0]))
             for i, layer in enumerate((layers[0], layers[-1]))]
    try:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0))
    finally:
        for h in hooks:
            h.remove()
    return outputs, list(zip(*seen))


def test_flat_steps_run_the_last_layer_on_their_sampled_rows_only(qwen2, test_device):
    _, path = qwen2
    # 48-token steps: chunks that end their prompt (one sampled row), chunks that do not (none), and decode rows
    # sharing a step with prefill chunks
    llm = LLM(path, max_num_batched_tokens=48, device=test_device)
    prompts = [list(range(3, 90))] + mixed_prompts(12, max_len=40)  # the first spans two steps and a half
    selected, rows = _generate(llm, prompts, select_rows=True)
    full, full_rows = _generate(llm, prompts, select_rows=False)
    assert all(last == first for first, last in full_rows)  # the switch is what changes the row counts
    flat = [(first, last) for first, last in rows if last < first]
    assert flat and all(last <= first for first, last in rows)
    assert any(last == 0 for _, last in flat)  # a step whose chunks sample nothing
    for a, b in zip(selected, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # only the last layer's matmuls see fewer rows (a BLAS may sum a row in another order for another row
        # count): within the fp32 log-prob contract
        assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) <= 1e-5
