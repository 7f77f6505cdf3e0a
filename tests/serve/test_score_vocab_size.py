"""The protocol's additions for remote training: /v1/score's optional `vocab_size` (normalise over the first V
columns), /health's `params` and tokenizer digests (`esr.serve.vocab`), and that older requests are unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from esr.serve.client import RemoteTeacher, RemoteTeacherError  # noqa: E402
from esr.serve.vocab import vocab_digest  # noqa: E402

V_CUT = 30_000


def post(server: Any, token: str, body: dict) -> Any:
    return requests.post(server.url + "/v1/score", json=body, headers={"Authorization": f"Bearer {token}"},
                         timeout=30)


@torch.no_grad()
def logprobs_over(model: Any, seq: list[int], start: int, V: int | None) -> torch.Tensor:
    """log p(x_j | x_<j) for j >= start, normalised over the first V logit columns (all when None)."""
    logits = model(input_ids=torch.tensor([seq])).logits[0, start - 1 : -1].float()
    logits = logits if V is None else logits[:, :V]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(seq[start:]).unsqueeze(-1)).squeeze(-1)


def test_vocab_size_normalises_over_the_first_columns(teacher, client):
    model, _ = teacher
    seq = [1, 17, 250, 9, 29_999, 4, 77]
    whole = client.score([seq], 2)[0].logprobs
    cut = client.score([seq], 2, vocab_size=V_CUT)[0]
    torch.testing.assert_close(whole, logprobs_over(model, seq, 2, None), atol=1e-5, rtol=0)
    torch.testing.assert_close(cut.logprobs, logprobs_over(model, seq, 2, V_CUT), atol=1e-5, rtol=0)
    assert float((cut.logprobs - whole).min()) > 1e-3  # less mass to share: each token's log-prob rises
    top = client.score([seq], 2, top_k=5, vocab_size=V_CUT)[0]
    assert int(top.top_ids.max()) < V_CUT
    torch.testing.assert_close(top.logprobs, cut.logprobs)


@pytest.mark.parametrize(("body", "needle"), [
    ({"sequences": [[1, 2, 3]], "start": 1, "vocab_size": 0}, "vocab_size must be an integer in [1, "),
    ({"sequences": [[1, 2, 3]], "start": 1, "vocab_size": 10**9}, "vocab_size must be an integer"),
    ({"sequences": [[1, 2, 3]], "start": 1, "vocab_size": True}, "vocab_size must be an integer"),
    ({"sequences": [[1, 40_000, 3]], "start": 1, "vocab_size": V_CUT}, "sequences[0][1] = 40000 is scored"),
    ({"sequences": [[1, 2, 3]], "start": 1, "vocab_size": 4, "top_k": 5}, "top_k=5 exceeds vocab_size=4"),
    ({"sequences": [[1, 2, 3]], "start": 1, "vocab": 10}, "unknown key(s) ['vocab']"),
])
def test_vocab_size_validation(server, token, body, needle):
    resp = post(server, token, body)
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"], resp.text


def test_context_tokens_past_vocab_size_are_allowed(server, token):
    """Only scored tokens must lie below vocab_size: the prompt may hold any id the model embeds."""
    resp = post(server, token, {"sequences": [[40_000, 2, 3]], "start": 1, "vocab_size": V_CUT})
    assert resp.status_code == 200 and len(resp.json()["logprobs"][0]) == 2


def test_openai_dialect_refuses_vocab_size(server, token):
    with RemoteTeacher(server.url, token=token, dialect="openai") as remote, pytest.raises(ValueError, match="esr"):
        remote.score([[1, 2, 3]], 1, vocab_size=V_CUT)


def test_health_publishes_params_and_tokenizer_digests(server, teacher, client):
    model, tok = teacher
    h = client.health()
    assert h["params"] == sum(p.numel() for p in model.parameters())
    assert h["tokenizer_sha256"] == vocab_digest(tok) != vocab_digest(tok, 1000)
    assert client.health(vocab_prefix=1000)["vocab_prefix_sha256"] == vocab_digest(tok, 1000)
    with pytest.raises(RemoteTeacherError, match="vocab_prefix must be an integer"):
        client.health(vocab_prefix=len(tok) + 1)


def test_vocab_digest_sees_one_changed_token():
    class Tok:
        def __init__(self, vocab: dict[str, int]) -> None:
            self.vocab = vocab

        def __len__(self) -> int:
            return len(self.vocab)

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

    a = Tok({"a": 0, "b": 1, "c": 2})
    assert vocab_digest(a) == vocab_digest(Tok({"c": 2, "a": 0, "b": 1}))  # order of the dict does not matter
    assert vocab_digest(a) != vocab_digest(Tok({"a": 0, "b": 2, "c": 1}))  # swapped ids do
    assert vocab_digest(a, 2) == vocab_digest(Tok({"a": 0, "b": 1, "<think>": 2, "x": 3}), 2)  # an extension
