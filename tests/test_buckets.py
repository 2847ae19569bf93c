"""Token buckets: the CPU backend decodes a lone stream in a one-token step
(XLA:CPU's matrix-vector path reads weights about twice as fast as its
2-8 row matrix products); every other step size is unchanged."""

from jpaged import LLM, SamplingParams
from jpaged.runner.buckets import bucket_for, token_buckets


def test_bucket_lists():
    assert token_buckets(512) == [8, 16, 32, 64, 128, 192, 256, 384, 512]
    assert token_buckets(512, single_token=True) == [1] + token_buckets(512)
    assert token_buckets(1, single_token=True) == [1]
    assert bucket_for(token_buckets(64, single_token=True), 1) == 1
    assert bucket_for(token_buckets(64, single_token=True), 2) == 8


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
