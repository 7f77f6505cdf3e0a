import torch

from esr.rollout.sampler import build_rollouts, left_pad

EOS, PAD = 2, 2  # pad == eos: the case where masking by `token != pad` drops the EOS the student must learn


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_mask_keeps_first_eos_when_pad_is_eos():
    prompt, pmask = left_pad([[5, 6], [7]], PAD)
    new = torch.tensor([[9, EOS, PAD, PAD], [9, 9, 9, 9]])
    r = build_rollouts(prompt, pmask, new, [EOS], horizon=4)
    assert r.response_mask_B_R.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert r.lengths_B.tolist() == [2, 4]
    assert r.cut_B.tolist() == [False, True]  # row 2 reached the horizon without EOS: a valid, cut sample
    assert r.attention_mask_B_L.tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]


def test_eos_at_first_position_and_several_eos_ids():
    prompt, pmask = left_pad([[5], [5]], PAD)
    new = torch.tensor([[EOS, 4, 4], [4, 3, 4]])
    r = build_rollouts(prompt, pmask, new, [EOS, 3], horizon=3)
    assert r.lengths_B.tolist() == [1, 2]
    assert r.cut_B.tolist() == [False, False]


def test_position_ids_skip_left_padding():
    prompt, pmask = left_pad([[5, 6, 7], [8]], 0)
    r = build_rollouts(prompt, pmask, torch.tensor([[1, 1], [1, 1]]), [EOS], horizon=2)
    assert r.position_ids_B_L.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def test_slice_trims_shared_padding():
    prompt, pmask = left_pad([[5, 6, 7], [8], [9]], PAD)
    new = torch.tensor([[4, 4, 4, EOS], [4, EOS, PAD, PAD], [EOS, PAD, PAD, PAD]])
    r = build_rollouts(prompt, pmask, new, [EOS], horizon=4)
    mb = r.slice(1, 3)
    assert mb.prompt_len == 1 and mb.input_ids_B_L.tolist() == [[8, 4, EOS], [9, EOS, PAD]]
    assert mb.response_mask_B_R.tolist() == [[True, True], [True, False]]
    assert mb.position_ids_B_L.tolist() == [[0, 1, 2], [0, 1, 1]]
