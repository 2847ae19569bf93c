"""One process of a two-process tensor-parallel run (tests/test_tp_multihost.py).

Usage: python3 tp_worker.py MODEL_DIR PROMPTS_JSON MAX_TOKENS [die]
with JPAGED_COORDINATOR, JPAGED_NUM_PROCESSES and JPAGED_PROCESS_ID set.
Process 0 prints the greedy tokens as one JSON line; ``die`` makes process 1
exit abruptly after its first step, with the other blocked in a collective.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

from jpaged import LLM, SamplingParams  # noqa: E402


def main() -> None:
    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    die = len(sys.argv) > 4 and sys.argv[4] == "die"
    llm = LLM(model_dir, tensor_parallel_size=2, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=16, max_model_len=64, num_kv_blocks=32,
              compile_all_buckets=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
        if die and steps == 2 and engine.mesh.devices.flat[1].process_index == \
                int(os.environ["JPAGED_PROCESS_ID"]):
            os._exit(3)
    if int(os.environ["JPAGED_PROCESS_ID"]) == 0:
        print(json.dumps([done[i] for i in range(len(prompts))]), flush=True)


if __name__ == "__main__":
    main()
