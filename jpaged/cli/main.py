"""The ``jpaged`` command: ``generate`` (offline batch), ``chat`` (terminal)
and ``serve`` (HTTP). Benchmarks are scripts under ``scripts/``.

Engine flags are named as ``vllm serve`` names them, so a vLLM command line
carries over. ``jpaged generate`` with no ``--model`` runs the built-in demo
model (a tiny random-weight Llama built offline on first use).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from jpaged.config.engine import add_engine_args, engine_config_from_args
from jpaged.distributed import multihost

def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults for every prompt)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "n",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                   "ignore_eos", "logprobs", "seed", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens")


def _read_prompts(args) -> list[tuple[str, dict]]:
    """(prompt, per-prompt sampling overrides) from --prompt and --prompts-file."""
    items = [(p, {}) for p in (args.prompt or [])]
    if args.prompts_file:
        with open(args.prompts_file) as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if args.prompts_file.endswith(".jsonl") or line.lstrip().startswith("{"):
                    obj = json.loads(line)
                    if "prompt" not in obj:
                        raise ValueError(f"{args.prompts_file}:{n}: JSONL line has no 'prompt'")
                    prompt = obj.pop("prompt")
                    unknown = set(obj) - set(SAMPLING_FIELDS)
                    if unknown:
                        raise ValueError(f"{args.prompts_file}:{n}: unknown fields "
                                         f"{sorted(unknown)}")
                    items.append((prompt, obj))
                else:
                    items.append((line, {}))
    if not items:
        items = [("The capital of France is", {}), ("Once upon a time", {})]
    return items


def cmd_generate(args) -> int:
    from jpaged import LLM, SamplingParams

    base = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                n=args.n, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, stop=args.stop,
                ignore_eos=args.ignore_eos, logprobs=args.logprobs, seed=args.sampling_seed)
    items = _read_prompts(args)
    params = [SamplingParams(**{**base, **over}) for _, over in items]
    recorder = None
    if args.plot:
        from jpaged.cli.plot import StepRecorder, require_matplotlib

        require_matplotlib()  # before the model loads, not after the run
        recorder = StepRecorder()
    llm = LLM(**vars(engine_config_from_args(args)))
    engine = llm.llm_engine
    if recorder is not None:
        recorder(engine)  # the counters before the first step
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in items], params, use_tqdm=len(items) > 1,
                        on_step=recorder)
    elapsed = time.perf_counter() - start
    if not multihost.is_leader():  # multi-host: process 0 writes the results
        return 0
    sink = open(args.output, "w") if args.output else None
    for out in outs:
        for c in out.outputs:
            rec = {"request_id": out.request_id, "prompt": out.prompt, "index": c.index,
                   "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                   "num_prompt_tokens": len(out.prompt_token_ids),
                   "num_cached_tokens": out.num_cached_tokens}
            if sink:
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                print(f"--- [{out.request_id}.{c.index}] {out.prompt!r}\n{c.text!r} "
                      f"({c.finish_reason})")
    if sink:
        sink.close()
    if recorder is not None:
        from jpaged.cli.plot import plot_run

        plot_run(recorder, args.plot, f"jpaged generate ({len(items)} prompts)")
        print(f"KV usage and throughput plot: {args.plot}", file=sys.stderr)
    s = engine.get_stats()
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    hit = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
    print(f"Summary: {len(outs)} requests, {n_prompt} prompt tokens, {n_out} output tokens "
          f"in {elapsed:.2f}s ({n_out / elapsed:.1f} output tokens/s); peak KV cache usage "
          f"{engine.peak_kv_usage:.1%}; prefix cache hit rate {hit:.1%}; "
          f"{s.num_preemptions} preemptions; {s.num_compiles} compiles", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """A terminal chat: each line of stdin is a user turn; the conversation
    goes through the model's chat template; ``/reset`` starts over."""
    from jpaged import LLM, SamplingParams

    llm = LLM(**vars(engine_config_from_args(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("user> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params, use_tqdm=False,
                         chat_template=args.chat_template)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jpaged", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate offline for prompts")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="text lines, or JSONL with 'prompt' and sampling "
                     "fields")
    gen.add_argument("--output", help="write results as JSONL to this file")
    gen.add_argument("--plot", metavar="FILE.png",
                     help="draw KV cache usage and throughput over the run to this image "
                     "(needs matplotlib: pip install 'jpaged[plot]')")
    add_engine_args(gen)
    add_sampling_args(gen)
    chat = sub.add_parser("chat", help="chat with a model in the terminal (stdin lines)")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--chat-template", default=None, help="override the model's template")
    add_engine_args(chat)
    add_sampling_args(chat)
    try:
        from jpaged.serve.args import add_serve_args
    except ImportError:
        add_serve_args = None
    if add_serve_args is not None:
        srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_engine_args(srv)
        srv.set_defaults(background_warmup=True)  # healthy after two buckets
        add_serve_args(srv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        multihost.settings(args.distributed_coordinator, args.num_processes, args.process_id)
        from jpaged.serve.openai.app import run_server

        return run_server(args)
    except ValueError as e:
        print(f"jpaged: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
