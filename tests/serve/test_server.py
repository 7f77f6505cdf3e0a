"""The teacher server against in-process computations: /v1/score, /v1/completions (vLLM's shape), auth, limits,
validation, concurrency, and RemoteTeacher.score_rollouts on real sampled rollouts."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from esr.serve.client import RemoteTeacher, RemoteTeacherError  # noqa: E402
from esr.serve.scoring import plan_micro_batches  # noqa: E402

ATOL = 1e-5


def random_sequences(n: int, vocab: int, *, seed: int, min_len: int = 2, max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


@torch.no_grad()
def in_process_logprobs(model: Any, seq: list[int]) -> torch.Tensor:
    """log_softmax of the model's own full forward pass: row j - 1 is the distribution of token j, (L - 1, V)."""
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def post(server: Any, path: str, token: str | None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(server.url + path, headers=headers, timeout=30, **kwargs)


def test_plan_micro_batches_bounds_padded_tokens():
    lengths = [5, 60, 30, 30, 2, 128, 7]
    groups = plan_micro_batches(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64


def test_score_matches_in_process_logprobs_and_topk(teacher, client):
    model, tokenizer = teacher
    seqs = random_sequences(9, len(tokenizer), seed=0, max_len=100)  # several micro-batches of <= 128 tokens
    g = torch.Generator().manual_seed(1)
    starts = [int(torch.randint(1, len(s) + 1, (1,), generator=g)) for s in seqs]
    scored = client.score(seqs, starts, top_k=5)
    assert len(scored) == len(seqs)
    for seq, start, s in zip(seqs, starts, scored, strict=True):
        logp = in_process_logprobs(model, seq)[start - 1 :]
        expected = logp.gather(-1, torch.tensor(seq[start:]).unsqueeze(-1)).squeeze(-1)
        assert s.logprobs.shape == (len(seq) - start,)
        torch.testing.assert_close(s.logprobs, expected, atol=ATOL, rtol=0)
        top = torch.topk(logp, 5, dim=-1)
        assert s.top_ids.shape == (len(seq) - start, 5)
        assert torch.equal(s.top_ids, top.indices)
        torch.testing.assert_close(s.top_logprobs, top.values, atol=ATOL, rtol=0)


def test_score_without_topk_and_wire_format(server, teacher, token):
    model, tokenizer = teacher
    seqs = random_sequences(3, len(tokenizer), seed=2)
    reply = post(server, "/v1/score", token, json={"sequences": seqs, "start": 1}).json()
    assert set(reply) >= {"logprobs", "top_ids", "top_logprobs", "seconds", "model"}
    assert reply["top_ids"] == [[], [], []] and reply["top_logprobs"] == [[], [], []]
    assert [len(x) for x in reply["logprobs"]] == [len(s) - 1 for s in seqs]
    assert reply["seconds"] >= 0 and reply["model"] == "tiny-teacher"


def test_completions_prompt_logprobs_match_vllm_shape_and_values(server, teacher, token):
    model, tokenizer = teacher
    prompts = random_sequences(3, len(tokenizer), seed=3, max_len=30)
    k = 3
    body = {"model": "tiny-teacher", "prompt": prompts, "max_tokens": 0, "prompt_logprobs": k, "echo": True}
    reply = post(server, "/v1/completions", token, json=body).json()
    assert reply["object"] == "text_completion" and reply["model"] == "tiny-teacher"
    assert reply["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, reply["choices"], strict=True):
        assert choice["text"] == tokenizer.decode(prompt)  # echo, nothing generated
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(prompt) and positions[0] is None
        logp = in_process_logprobs(model, prompt)
        for j in range(1, len(prompt)):
            entries = positions[j]
            token_entry = entries[str(prompt[j])]
            assert token_entry["logprob"] == pytest.approx(float(logp[j - 1, prompt[j]]), abs=ATOL)
            assert token_entry["rank"] == int((logp[j - 1] >= logp[j - 1, prompt[j]]).sum())
            assert token_entry["decoded_token"] == tokenizer.decode([prompt[j]])
            top = torch.topk(logp[j - 1], k)
            ranked = sorted(entries.items(), key=lambda kv: kv[1]["rank"])[:k]
            assert [int(t) for t, _ in ranked] == top.indices.tolist()
            assert [e["rank"] for _, e in ranked] == [1, 2, 3]
            assert [e["logprob"] for _, e in ranked] == pytest.approx(top.values.tolist(), abs=ATOL)
            assert len(entries) in (k, k + 1)  # the prompt token is extra unless it is among the top k


def test_completions_single_prompt_and_one_generated_token(server, teacher, token):
    model, tokenizer = teacher
    prompt = random_sequences(1, len(tokenizer), seed=4)[0]
    body = {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True}
    choice = post(server, "/v1/completions", token, json=body).json()["choices"][0]
    with torch.no_grad():
        greedy = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    assert choice["token_ids"] == [greedy] and choice["prompt_token_ids"] == prompt
    assert choice["text"] == tokenizer.decode([greedy])
    assert all(len(e) == 1 for e in choice["prompt_logprobs"][1:])  # k = 0: only the prompt token


def test_openai_dialect_client_equals_esr_dialect(server, teacher, token, client):
    _, tokenizer = teacher
    seqs = random_sequences(5, len(tokenizer), seed=5)
    starts = [max(1, len(s) // 2) for s in seqs]
    with RemoteTeacher(server.url, token=token, dialect="openai") as openai_client:
        assert openai_client.health()["model"] == "tiny-teacher"
        via_openai = openai_client.score(seqs, starts, top_k=4)
    via_esr = client.score(seqs, starts, top_k=4)
    for a, b in zip(via_esr, via_openai, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
        assert torch.equal(a.top_ids, b.top_ids)
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs, atol=1e-6, rtol=0)


def test_auth(server, token):
    body = {"sequences": [[1, 2, 3]], "start": 1}
    assert post(server, "/v1/score", None, json=body).status_code == 401
    wrong = post(server, "/v1/score", "wrong-token", json=body)
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]["message"]
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert post(server, "/v1/completions", None, json={"prompt": [1, 2], "max_tokens": 0}).status_code == 401
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, "/v1/score", token, json=body).status_code == 200
    health = requests.get(server.url + "/health", timeout=10)  # open, like vLLM's
    assert health.status_code == 200 and health.json()["vocab_size"] == 49152
    with RemoteTeacher(server.url, token="wrong-token") as bad, pytest.raises(RemoteTeacherError) as err:
        bad.score([[1, 2, 3]], 1)
    assert err.value.status == 401


def test_oversized_body_gets_413(server, token):
    big = {"sequences": [[1] * 100] * 2000, "start": 1}  # ~ 800 KB > the fixture's 256 KiB
    reply = post(server, "/v1/score", token, json=big)
    assert reply.status_code == 413 and "limit" in reply.json()["error"]["message"]

    def chunks():  # no Content-Length: refused while streaming
        yield b'{"sequences": [['
        for _ in range(200):
            yield b"1," * 1000
        yield b"1]], \"start\": 1}"
    assert post(server, "/v1/score", token, data=chunks()).status_code == 413


@pytest.mark.parametrize("body, status, needle", [
    ({"sequences": [[5, 49152]], "start": 1}, 400, "sequences[0][1] = 49152 is outside the vocabulary"),
    ({"sequences": [[5, -1, 7]], "start": 1}, 400, "outside the vocabulary"),
    ({"sequences": [[5, 6]], "start": 0}, 400, "start[0] = 0 is out of range"),
    ({"sequences": [[5, 6]], "start": 3}, 400, "start[0] = 3 is out of range"),
    ({"sequences": [[5, 6], [7, 8]], "start": [1]}, 400, "one per sequence"),
    ({"sequences": [[]], "start": 1}, 400, "non-empty"),
    ({"sequences": [[5, 6.5]], "start": 1}, 400, "is not a token id"),
    ({"sequences": [[5, True]], "start": 1}, 400, "is not a token id"),
    ({"sequences": [[5] * 200], "start": 1}, 400, "at most 128 per sequence"),
    ({"sequences": [[5, 6]], "start": 1, "top_k": 21}, 400, "top_k must be an integer in [0, 20]"),
    ({"sequence": [[5, 6]], "start": 1}, 400, "unknown key"),
    ({"sequences": [[5, 6]], "start": 1, "model": "other"}, 404, "the model `other` does not exist"),
])
def test_score_validation_errors(server, token, body, status, needle):
    reply = post(server, "/v1/score", token, json=body)
    assert reply.status_code == status
    assert needle in reply.json()["error"]["message"]


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "some text", "max_tokens": 0}, 400, "token ids"),
    ({"prompt": [1, 2, 3]}, 400, "max_tokens must be 0 or 1"),
    ({"prompt": [1, 2, 3], "max_tokens": 0, "prompt_logprobs": -1}, 400, "prompt_logprobs must be"),
    ({"prompt": [1, 2, 3], "max_tokens": 0, "logprobs": 2}, 400, "prompt_logprobs"),
    ({"prompt": [1, 2, 3], "max_tokens": 0, "model": "gpt-x"}, 404, "does not exist"),
    ({"prompt": [[1, 2, 99999]], "max_tokens": 0}, 400, "prompt[0][2] = 99999"),
])
def test_completions_validation_errors(server, token, body, status, needle):
    reply = post(server, "/v1/completions", token, json=body)
    assert reply.status_code == status
    assert needle in reply.json()["error"]["message"]


def test_bad_json_and_unknown_path(server, token):
    reply = post(server, "/v1/score", token, data=b"{not json")
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    assert requests.get(server.url + "/v2/nothing", timeout=10).status_code == 404
    assert requests.get(server.url + "/v1/score", timeout=10).status_code == 405


def test_client_raises_server_message_on_4xx(client):
    with pytest.raises(RemoteTeacherError, match="outside the vocabulary") as err:
        client.score([[1, 2, 10**6]], 1)
    assert err.value.status == 400


def test_concurrent_requests_agree_with_sequential(server, teacher, token, client):
    _, tokenizer = teacher
    batches = [random_sequences(4, len(tokenizer), seed=10 + i, max_len=90) for i in range(6)]
    expected = [client.score(b, 1, top_k=2) for b in batches]
    got: list[Any] = [None] * len(batches)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with RemoteTeacher(server.url, token=token) as own:
                got[i] = own.score(batches[i], 1, top_k=2)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for exp, res in zip(expected, got, strict=True):
        for a, b in zip(exp, res, strict=True):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=ATOL, rtol=0)
            assert torch.equal(a.top_ids, b.top_ids)


def test_client_splits_into_batches(server, teacher, token):
    _, tokenizer = teacher
    seqs = random_sequences(7, len(tokenizer), seed=20)
    with RemoteTeacher(server.url, token=token) as whole, RemoteTeacher(server.url, token=token,
                                                                          max_batch_sequences=2) as split:
        for a, b in zip(whole.score(seqs, 1), split.score(seqs, 1), strict=True):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=ATOL, rtol=0)


def test_score_rollouts_equals_in_process_teacher(teacher, client):
    from esr.losses import token_logprobs
    from esr.models import load_model
    from esr.rollout.sampler import HFSampler, build_rollouts, left_pad
    from esr.teacher.score import LocalScorer

    model, tokenizer = teacher
    student, student_tok = load_model("tiny-student")
    assert student_tok.get_vocab() == tokenizer.get_vocab()  # the pair in configs/smoke.yaml shares one tokenizer
    questions = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "Hi", "Count to five."]
    prompt_ids = [student_tok(q).input_ids for q in questions]  # different lengths: left padding
    sampler = HFSampler(student, eos_token_ids=[student_tok.eos_token_id], pad_token_id=student_tok.pad_token_id,
                        temperature=1.0)
    sampled = sampler.sample(prompt_ids, 24, seed=0)
    # Declare two sampled tokens "EOS" too, so rows stop at different lengths and the mask has holes to respect.
    extra_eos = [int(sampled.response_ids_B_R[0, 5]), int(sampled.response_ids_B_R[2, 11])]
    ids_B_P, mask_B_P = left_pad(prompt_ids, student_tok.pad_token_id)
    rollouts = build_rollouts(ids_B_P, mask_B_P, sampled.response_ids_B_R, [student_tok.eos_token_id, *extra_eos],
                              horizon=24)
    assert len(set(rollouts.lengths_B.tolist())) > 1

    remote = client.score_rollouts(rollouts, top_k=3)

    V = model.get_output_embeddings().weight.shape[0]
    scorer = LocalScorer(model, vocab_size=V)
    logits_B_R_V = scorer.logits(scorer.score(rollouts))
    expected_B_R = token_logprobs(logits_B_R_V, rollouts.response_ids_B_R)
    mask = rollouts.response_mask_B_R
    assert remote.logprobs_B_R.shape == mask.shape
    torch.testing.assert_close(remote.logprobs_B_R[mask], expected_B_R[mask], atol=ATOL, rtol=0)
    assert (remote.logprobs_B_R[~mask] == 0).all()
    top = torch.topk(torch.log_softmax(logits_B_R_V, dim=-1), 3, dim=-1)
    assert remote.top_ids_B_R_K.shape == (*mask.shape, 3)
    assert torch.equal(remote.top_ids_B_R_K[mask], top.indices[mask])
    torch.testing.assert_close(remote.top_logprobs_B_R_K[mask], top.values[mask], atol=ATOL, rtol=0)
