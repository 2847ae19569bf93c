"""Token buckets: on a CPU a lone stream decodes in a one-token step (a
one-row product reads the weights faster than 8 padded rows) and steps of 16
tokens or more have 1.5x buckets (they are bound by arithmetic, so padding
costs); a GPU has the 1.5x buckets only from 128."""

from jpaged import LLM, SamplingParams
from jpaged.runner.buckets import bucket_for, token_buckets


def test_bucket_lists():
    assert token_buckets(512) == [8, 16, 32, 64, 128, 192, 256, 384, 512]
    assert token_buckets(512, cpu=True) == [1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384,
                                            512]
    assert token_buckets(16, cpu=True) == [1, 8, 16]
    assert token_buckets(64, cpu=True) == [1, 8, 16, 24, 32, 48, 64]
    assert token_buckets(1, cpu=True) == [1]
    assert bucket_for(token_buckets(64, cpu=True), 1) == 1
    assert bucket_for(token_buckets(64, cpu=True), 2) == 8
    assert bucket_for(token_buckets(64, cpu=True), 33) == 48


def test_single_stream_decodes_in_a_one_token_step(llama_dir):
    llm = LLM(llama_dir, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
              block_size=8, compile_all_buckets=False)
    eng = llm.llm_engine
    assert eng.runner.buckets[0] == 1
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0,
                                                   ignore_eos=True))
    eng.step()  # the prompt (bucket 8)
    assert eng.runner._last[1].num_tokens == 8
    eng.step()  # one decode token
    assert eng.runner._last[1].num_tokens == 1
