"""`LLM`: offline batched generation, the way ``vllm.LLM`` is used.

    llm = LLM(model="path/to/hf-dir")
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))

All prompts are queued at once; the engine's continuous batching does the
rest. Outputs come back in input order.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from jpaged.config.engine import EngineConfig
from jpaged.engine.llm_engine import LLMEngine
from jpaged.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from jpaged.sampling_params import BeamSearchParams, SamplingParams
from jpaged.tokenizer import apply_chat_template


class LLM:
    """Offline generator. Keyword arguments are `EngineConfig` fields."""

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        on_step: Callable[[LLMEngine], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (strings, token-id lists,
        or dicts with ``prompt``/``prompt_token_ids``). ``on_step(engine)``, if
        given, is called after every engine step (e.g. to record counters)."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        # Only the final output of each request is read: build nothing before it.
        params = [_final_only(sp) for sp in params]
        engine = self.llm_engine
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = str(next(self._counter))
                engine.add_request(rid, p, sp, priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm, on_step)

    def beam_search(self, prompts, params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search for each prompt (given as to `generate`), inside the
        engine: the beams of every prompt decode in the same steps and share
        their KV blocks. Returns one `BeamSearchOutput` per prompt, its
        ``beam_width`` sequences best first."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be BeamSearchParams, got {type(params).__name__}")
        sp = params.sampling_params()
        outs = self.generate(prompts, sp, use_tqdm=use_tqdm)
        tok = self.get_tokenizer()
        results = []
        for out in outs:
            seqs = []
            for c in out.outputs:
                gen = list(c.token_ids)
                if c.finish_reason == "stop" and not params.include_stop_str_in_output:
                    gen = gen[:-1]
                tokens = list(out.prompt_token_ids) + gen
                n = max(len(c.token_ids), 1)
                seqs.append(BeamSearchSequence(
                    tokens=tokens, logprobs=c.logprobs, cum_logprob=c.cumulative_logprob,
                    text=tok.decode(tokens, skip_special_tokens=True),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    score=c.cumulative_logprob / n ** params.length_penalty))
            results.append(BeamSearchOutput(seqs))
        return results

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True):
        """Generate replies for one conversation or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": tok(
            apply_chat_template(tok, c, add_generation_prompt=add_generation_prompt,
                                chat_template=chat_template),
            add_special_tokens=False).input_ids} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool, on_step=None) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while engine.has_unfinished_requests():
                outs = engine.step()
                if on_step is not None:
                    on_step(engine)
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            out_tokens += sum(len(o.token_ids) for o in out.outputs)
                            bar.update(1)
                            bar.set_postfix_str(
                                f"output: {out_tokens / (time.perf_counter() - start):.1f} tok/s")
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


def _final_only(sp: SamplingParams) -> SamplingParams:
    if sp.output_kind == "final_only":
        return sp
    sp = sp.clone()
    sp.output_kind = "final_only"
    return sp
