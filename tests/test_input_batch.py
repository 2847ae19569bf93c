"""The persistent batch alone: what one packed step holds, worked out by hand.
No model, no JAX device work."""

import numpy as np

from jpaged.runner.buckets import bucket_for, token_buckets
from jpaged.runner.input_batch import MAX_BANNED, InputBatch
from jpaged.sampling_params import SamplingParams
from jpaged.sched import Request, ScheduledRequest, SchedulerOutput

BS, NB, V, R = 4, 32, 100, 4
EOS = 90  # above every stop id below: an ascending cut would drop it


def make_batch():
    return InputBatch(max_num_seqs=R, max_model_len=64, max_blocks_per_seq=16, block_size=BS,
                      num_blocks=NB, vocab_size=V)


def req(rid, tokens, n_prompt=None, **sp):
    params = SamplingParams(**sp)
    params.all_stop_token_ids = set(params.stop_token_ids) | {EOS}
    r = Request(request_id=rid, group_id=rid, prompt_token_ids=tokens[:n_prompt],
                sampling_params=params, arrival_time=0.0, seed=5, max_tokens=16)
    r.all_token_ids = list(tokens)
    return r


def build(batch, scheduled, copies=()):
    out = SchedulerOutput(scheduled=scheduled, copies=list(copies),
                          num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled))
    built = batch.build(out, lambda n: bucket_for(token_buckets(64), n), {EOS}, pallas=False)
    return built, built.layout.views(built.buf)


def test_join_prefill_and_resume_pack_tokens_slots_and_rows():
    b = make_batch()
    a = req("a", [10, 11, 12, 13, 14])  # 5-token prompt, whole prefill
    c = req("c", [20, 21, 22, 23, 24, 25, 26], n_prompt=6)  # resumed: 3 computed, 4 new
    a.num_computed_tokens, a.num_output_placeholders = 5, 1
    c.num_computed_tokens, c.num_output_placeholders = 7, 1
    built, v = build(b, [
        ScheduledRequest(a, 5, 0, [7, 8], num_samples=1, start=0, joined=True),
        ScheduledRequest(c, 4, 0, [3, 9], num_samples=1, start=3, joined=True)])
    ra, rc = b.rows["a"], b.rows["c"]
    assert built.layout.num_tokens == 16  # bucket of 9 tokens
    assert v["input_ids"][:9].tolist() == [10, 11, 12, 13, 14, 23, 24, 25, 26]
    assert v["positions"][:9].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    # slot = block * BS + offset, through each row's block table.
    assert v["slot_mapping"][:9].tolist() == [28, 29, 30, 31, 32, 15, 36, 37, 38]
    assert (v["slot_mapping"][9:] == NB * BS).all()  # padding is dropped
    assert v["token_rows"][:9].tolist() == [ra] * 5 + [rc] * 4
    assert v["query_start_loc"][:4].tolist() == [0, 5, 9, 9]
    assert v["context_lens"][:2].tolist() == [5, 7]
    assert v["logits_indices"][:2].tolist() == [4, 8]
    # Joining sends the whole block-table rows.
    upd = sorted(zip(v["upd_rows"], v["upd_cols"], v["upd_vals"]))
    assert [u for u in upd if u[0] < R] == sorted([(ra, 0, 7), (ra, 1, 8), (rc, 0, 3),
                                                    (rc, 1, 9)])
    assert v["output_len"][:2].tolist() == [0, 1]  # tokens generated before this sample


def test_decode_of_unread_token_is_taken_on_device_and_only_changes_travel():
    b = make_batch()
    a = req("a", [10, 11, 12])
    a.num_computed_tokens, a.num_output_placeholders = 3, 1
    build(b, [ScheduledRequest(a, 3, 0, [5], num_samples=1, start=0, joined=True)])
    # Async: step 2 is built before step 1's token is read: position 3 is unknown.
    a.num_computed_tokens, a.num_output_placeholders = 4, 2
    built, v = build(b, [ScheduledRequest(a, 1, 1, [], num_samples=1, start=3)])
    assert v["input_ids"][0] == -1 and v["positions"][0] == 3
    assert v["slot_mapping"][0] == 5 * BS + 3
    assert (v["upd_rows"] == R).all()  # nothing in the block table changed
    # Crossing into a new block sends that one entry only.
    a.num_computed_tokens = 5
    built, v = build(b, [ScheduledRequest(a, 1, 1, [6], num_samples=1, start=4)])
    assert v["slot_mapping"][0] == 6 * BS
    assert [(int(r), int(c), int(x)) for r, c, x in zip(v["upd_rows"], v["upd_cols"],
                                                        v["upd_vals"]) if r < R] == [
        (b.rows["a"], 1, 6)]


def test_min_tokens_bans_eos_even_with_many_stop_token_ids():
    b = make_batch()
    stops = list(range(40, 40 + 2 * MAX_BANNED))  # more than a row can ban, all below EOS
    a = req("a", [10, 11], min_tokens=3, stop_token_ids=stops)
    a.all_token_ids = [10, 11]
    a.num_computed_tokens, a.num_output_placeholders = 2, 1
    _, v = build(b, [ScheduledRequest(a, 2, 0, [1], num_samples=1, start=0, joined=True)])
    assert EOS in v["banned"][0].tolist()
    # Once min_tokens are out, nothing is banned.
    a.all_token_ids += [30, 31, 32]
    a.num_computed_tokens, a.num_output_placeholders = 5, 1
    _, v = build(b, [ScheduledRequest(a, 1, 1, [], num_samples=1, start=4)])
    assert (v["banned"][0] == V).all()


def test_n_samples_rows_and_mid_prefill_rows_do_not_write_last_tokens():
    b = make_batch()
    a = req("a", list(range(10, 18)), n=3, temperature=1.0)
    a.num_computed_tokens = 4
    _, v = build(b, [ScheduledRequest(a, 4, 0, [1], num_samples=0, start=0, joined=True)])
    assert v["sample_token_rows"][0] == R  # mid-prefill: the sample is discarded
    a.num_computed_tokens, a.num_output_placeholders = 8, 1
    _, v = build(b, [ScheduledRequest(a, 4, 1, [2], num_samples=3, start=4)])
    row = b.rows["a"]
    assert v["sample_index"][:3].tolist() == [0, 1, 2]
    assert v["sample_token_rows"][:3].tolist() == [row] * 3
    assert v["logits_indices"][:3].tolist() == [3, 3, 3]
    assert np.allclose(v["temperature"][:3], 1.0)
    assert v["flags"].tolist() == [0, 0, 0, 1, 0]  # any_random only
