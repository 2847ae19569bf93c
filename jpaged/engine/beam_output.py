"""The output of a finished beam search: its best hypotheses as a `RequestOutput`.

A beam search emits one output, when it is done (intermediate beams are not
prefixes of the final ones). Its ``outputs`` are the best
``num_return_sequences`` hypotheses, best first, as transformers ranks them
(``cum_logprob / generated_len ** length_penalty``): token ids with the
ending EOS or stop id (as `LLM.generate` gives them), the text without it
unless ``include_stop_str_in_output``, the cumulative logprob and, when asked
for, each token's logprob.
"""

from __future__ import annotations

import time

from jpaged.outputs import CompletionOutput, Logprob, RequestOutput


def beam_request_output(state, group, tokenizer) -> RequestOutput:
    """Build the final `RequestOutput` of ``group`` (a done `BeamGroup`) for
    ``state`` (its `RequestState`)."""
    sp = state.params
    hyps = group.state.best(sp.num_return_sequences, getattr(group, "final_beams", ()))
    outs = []
    for i, h in enumerate(hyps):
        shown = h.tokens
        ends = h.finish_reason == "stop"
        if ends and not sp.include_stop_str_in_output:
            shown = h.tokens[:-1]
        text = tokenizer.decode(shown, skip_special_tokens=sp.skip_special_tokens)
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [{t: Logprob(lp)} for t, lp in zip(h.tokens, h.logprobs)]
        stop_reason = None
        if ends and h.tokens[-1] in sp.stop_token_ids:
            stop_reason = h.tokens[-1]
        outs.append(CompletionOutput(
            index=i, text=text, token_ids=list(h.tokens), cumulative_logprob=h.cum_logprob,
            logprobs=logprobs, finish_reason=h.finish_reason, stop_reason=stop_reason))
    m = state.metrics
    now = time.time()
    m.finished_time = m.last_token_time = now
    if m.first_token_time is None:
        m.first_token_time = now
    root = group.root
    m.first_scheduled_time = root.first_scheduled_time
    m.num_preemptions = group.num_preemptions
    return RequestOutput(
        request_id=state.request_id, prompt=state.prompt,
        prompt_token_ids=state.prompt_token_ids, outputs=outs, finished=True,
        num_cached_tokens=max(root.num_cached_tokens, 0), metrics=m)
