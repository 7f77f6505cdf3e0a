"""``esr export --push-to-hub REPO``: upload an exported folder to the Hugging Face Hub with ``huggingface_hub``
(``HfApi.create_repo`` then ``upload_folder``). The token is the usual one: ``HF_TOKEN``, or what ``hf auth login``
stored; ``HF_ENDPOINT`` points at another hub. The folder is complete before the push starts, so a failed push loses
nothing: the message says how to push the same folder again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from esr.export.source import ExportError


def push_folder(folder: Path, repo: str, *, private: bool = False) -> str:
    """Create ``repo`` (a model repo; kept if it exists) and upload ``folder`` to it; returns the commit's URL.
    ``ExportError`` (one line naming the repo and what to check) when there is no token, the hub cannot be reached or
    refuses."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    again = f"The exported folder {folder} is complete; push it with `hf upload {repo} {folder}`"
    token = get_token()
    if not token:
        raise ExportError(f"no Hugging Face token to push {repo}: set HF_TOKEN or run `hf auth login`. {again}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="esr export")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = ("check that the token may write to it (a write token; the org's permissions)" if status in (401, 403)
                else "check the repo id (owner/name)")
        raise ExportError(f"the hub refused the push to {repo} (HTTP {status}): {hint}. {again}") from e
    except (OSError, ValueError, *_transport_errors()) as e:  # no network, DNS, refused, timeouts; a bad repo id
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"could not push to {repo} on {constants.ENDPOINT} ({type(e).__name__}: {why}): check "
                          f"the network, HF_ENDPOINT and the repo id. {again}") from e
    return str(getattr(info, "commit_url", info))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's own base errors (connection refused, DNS, timeouts), which are no OSError: huggingface_hub
    has used requests, httpx and httpx2 over its versions, so whichever of them imports is caught."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
