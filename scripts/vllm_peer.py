#!/usr/bin/env python3
"""Run one workload through vLLM (the peer), for scripts/bench_throughput.py.

Runs under the peer's own venv (see scripts/setup_vllm_peer.sh), never
jpaged's: ``python vllm_peer.py SPEC.json`` reads the model, the prompts (token
ids), the output lengths and the engine options, runs one warm-up request
(as jpaged compiles at start-up), then times ``LLM.generate`` on the whole
workload with greedy sampling and ``ignore_eos``, and prints one JSON line (after a marker):
the elapsed seconds and the generated token ids.
"""

import json
import sys
import time

MARK = "JPAGED_PEER_RESULT "


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"),
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=spec["prefix_caching"], seed=0)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [11, 12, 13]}], warm, use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)
              for o in spec["out_lens"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    # One marked line: vLLM's own logging may also write to stdout.
    print(MARK + json.dumps({"elapsed": elapsed,
                             "tokens": [list(o.outputs[0].token_ids) for o in outs]}),
          flush=True)


if __name__ == "__main__":  # vLLM spawns worker processes: keep this guard
    main()
